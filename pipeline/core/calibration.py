"""Calibration text -> `nsamples` token windows of `seqlen`, drawn with a fixed seed, tokenised with
the model's own tokenizer. Sources: a glob, a directory or a file (text/code; `.jsonl` records),
or "hf:DATASET[:CONFIG]:SPLIT:FIELD" through the `datasets` library when it is installed."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.bounded import MAX_LINE_BYTES, checked_path, loads_json
from pipeline.core.errors import InputError

if TYPE_CHECKING:
    import torch

JSONL_FIELDS = ("text", "content", "code")  # the first one a record has is its document
NSAMPLES, SEQLEN, SEED = 128, 2048, 0  # GPTQ's calibration: 128 random 2048-token windows
MIN_NSAMPLES, MIN_SEQLEN = 1, 2  # a window is BOS + at least one text token
POOL_FACTOR = 4  # documents are read (in seeded order) until the pool holds 4× the tokens needed


GLOB_CHARS = re.compile(r"[*?\[]")


def glob_root(pattern: str) -> tuple[Path, tuple[str, ...]]:
    """A glob's fixed leading folder and the pattern's parts below it."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if GLOB_CHARS.search(part)), len(parts))
    return (Path(*parts[:fixed]) if fixed else Path(".")), parts[fixed:]


def glob_paths(pattern: str) -> list[Path]:
    """What a glob (`**`: any depth) matches, as glob.glob would, hidden names skipped, but never
    through a symbolic link to a directory, so a link loop cannot multiply the matches."""
    top, rest = glob_root(pattern)
    if not rest:
        return [top] if top.exists() else []
    found = top.glob(str(Path(*rest))) if top.is_dir() else []
    return sorted(p for p in found
                  if not any(x.startswith(".") for x in p.relative_to(top).parts))


def local_files(source: str) -> list[Path]:
    """The files a glob (`**` recursive), a directory (recursively, hidden entries skipped) or a
    single file names, sorted; an empty match is an error."""
    path = checked_path(source, "text source")
    if path.is_dir():
        files = [p for p in path.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    elif path.is_file():
        files = [path]
    else:
        files = [p for p in glob_paths(source) if p.is_file()]
    if not files:
        raise InputError(f"calibration source {source!r}: no files found (give a glob such as "
                         "'data/**/*.py', a directory, a file, or hf:DATASET:SPLIT:FIELD)")
    return sorted(files)


def file_documents(path: Path) -> Iterator[str]:
    """A text file is one document; each record of a .jsonl file is one (its text field)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return  # binary files in a directory source are skipped
    if path.suffix != ".jsonl":
        yield text
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise InputError(f"{path}:{lineno}: a record of {len(line)} characters (the limit "
                             f"is {MAX_LINE_BYTES})")
        record = loads_json(line, f"{path}:{lineno}")
        field = next((f for f in JSONL_FIELDS if isinstance(record, dict) and f in record), None)
        if field is None:
            raise InputError(f"{path}:{lineno}: a JSONL record needs one of the fields {JSONL_FIELDS}")
        yield str(record[field])


def hf_documents(source: str, seed: int | None) -> Iterator[str]:
    """Documents of "hf:DATASET[:CONFIG]:SPLIT:FIELD", streamed; shuffled with the seed, or in
    the dataset's order when seed is None (evaluation text)."""
    parts = source[len("hf:"):].split(":")
    if len(parts) not in (3, 4):
        raise InputError(f"text source {source!r}: expected hf:DATASET[:CONFIG]:SPLIT:FIELD")
    name, config, split, field = parts if len(parts) == 4 else (parts[0], None, *parts[1:])
    try:
        import datasets
    except ImportError as e:
        raise InputError(f"text source {source!r} needs the `datasets` library "
                         "(pip install datasets), or use local files") from e
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for record in ds if seed is None else ds.shuffle(seed=seed, buffer_size=10_000):
            if field not in record:
                raise InputError(f"text source {source!r}: records have no field {field!r} "
                                 f"(fields: {sorted(record)})")
            yield str(record[field])
    except InputError:
        raise
    except Exception as e:  # network, missing dataset or split: the library's own message
        raise InputError(f"text source {source!r}: {e}") from e


def documents(source: str, seed: int) -> tuple[Iterator[str], dict[str, Any]]:
    """Documents of a source in a seeded order, and a description of it (updated as read)."""
    if source.startswith("hf:"):
        return hf_documents(source, seed), {"source": source, "kind": "hf", "files": 0}
    files = local_files(source)
    random.Random(seed).shuffle(files)
    info: dict[str, Any] = {"source": source, "kind": "files", "files": 0}

    def read() -> Iterator[str]:
        for f in files:
            for k, doc in enumerate(file_documents(f)):
                info["files"] += k == 0  # files that gave text
                yield doc
    return read(), info


def load_calibration(source: str, tokenizer: Any, nsamples: int, seqlen: int,
                     seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token windows [nsamples, seqlen] (int64), each BOS + seqlen−1 tokens of the document stream
    (documents joined by EOS), chosen without overlap by a seeded permutation; plus the record
    for quant_log.json (source, files read, sha256 of the text read, tokens in the pool)."""
    if nsamples < MIN_NSAMPLES or seqlen < MIN_SEQLEN:
        raise InputError(f"--nsamples {nsamples} / --seqlen {seqlen}: need at least "
                         f"{MIN_NSAMPLES} and {MIN_SEQLEN}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    span = seqlen - 1 if bos is not None else seqlen  # text tokens per window
    docs, info = documents(source, seed)
    sha = hashlib.sha256()
    stream: list[int] = []
    for doc in docs:
        if not doc.strip():
            continue
        sha.update(doc.encode())
        stream += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        stream += [eos] if eos is not None else []
        if len(stream) >= POOL_FACTOR * nsamples * span:
            break
    available = len(stream) // span
    if available < nsamples:
        raise InputError(f"calibration source {source!r}: {len(stream)} tokens make {available} "
                         f"windows of {seqlen} tokens, {nsamples} requested; add text or lower "
                         "--nsamples/--seqlen")
    import torch  # torch-free to import: a recipe reads this module's limits

    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=g)[:nsamples].sort().values
    pool = torch.tensor(stream[:available * span], dtype=torch.long).view(available, span)
    windows = pool[picks]
    if bos is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos, dtype=torch.long), windows], dim=1)
    info.update(sha256=sha.hexdigest(), nsamples=nsamples, seqlen=seqlen, seed=seed,
                tokens=len(stream))
    return windows, info
