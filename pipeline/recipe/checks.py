"""The recipe's rules across keys and against the stages' facts (bit widths, dtypes, GGUF types,
runtimes, thresholds), checked once when it is loaded; each error names the file and the key."""

from __future__ import annotations

import re

from huggingface_hub.utils import HFValidationError, validate_repo_id

from pipeline.core import chat
from pipeline.core.bounded import parse_size
from pipeline.core.calibration import MIN_NSAMPLES, MIN_SEQLEN
from pipeline.core.dtypes import STORAGE_DTYPES
from pipeline.core.errors import InputError
from pipeline.core.gguf_types import TYPES
from pipeline.core.gptq_layout import BITS
from pipeline.recipe.schema import SOURCE_FORMATS, Recipe
from verify import thresholds
from verify.runtimes import RUNTIMES

# a branch (git's ref rules, narrowed to what the Hub and file names take) and a model name (a
# plain file name: it names GGUF files and repositories); re.ASCII: \w is [A-Za-z0-9_]
BRANCH = re.compile(r"[A-Za-z0-9][\w.-]{0,99}", re.ASCII)
MODEL_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
REVISION = re.compile(r"[A-Za-z0-9][\w./-]{0,199}", re.ASCII)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}", re.ASCII)


def check_model(r: Recipe) -> None:
    name = r.model.name
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise InputError(f"{r.path}: [model] name = {name!r}: use up to 96 letters, digits, '.', "
                         "'_', '-', starting with a letter or digit, no '..' (it names the GGUF "
                         "files and the repositories, so it must be a plain file name)")
    if "{prompt}" not in r.model.prompt_template:
        raise InputError(f"{r.path}: [model] prompt_template must contain {{prompt}}")
    if r.verify.chat_prompts and r.model.chat_format == "none":
        raise InputError(f"{r.path}: [verify] chat_prompts needs a [model] chat_format "
                         f"({', '.join(f for f in chat.FORMATS if f != 'none')})")


def check_source(r: Recipe) -> None:
    s = r.source
    if s.format not in SOURCE_FORMATS:
        raise InputError(f"{r.path}: [source] format = {s.format!r}: must be one of "
                         f"{', '.join(SOURCE_FORMATS)}")
    given = [k for k in ("path", "env", "repo") if getattr(s, k) is not None]
    allowed = "`path`, `env` or `repo`" if s.is_hf else "`path` or `env`"
    if len(given) != 1 or (s.repo is not None and not s.is_hf):
        raise InputError(f"{r.path}: [source] needs exactly one of {allowed} "
                         f"(got {', '.join(given) or 'none'})")
    if s.repo is not None:
        problem = repo_problem(s.repo)
        if problem:
            raise InputError(f"{r.path}: [source] repo = {s.repo!r}: {problem}")
    if not REVISION.fullmatch(s.revision) or ".." in s.revision:
        raise InputError(f"{r.path}: [source] revision = {s.revision!r}: expected a branch, tag "
                         "or commit (letters, digits, ._-/ only)")
    if s.env is not None and not ENV_NAME.fullmatch(s.env):
        raise InputError(f"{r.path}: [source] env = {s.env!r} is not an environment variable name")


def check_convert(r: Recipe) -> None:
    c = r.convert
    if c.dtype not in STORAGE_DTYPES:
        raise InputError(f"{r.path}: [convert] dtype = {c.dtype!r}: must be one of "
                         f"{', '.join(STORAGE_DTYPES)}")
    try:
        parse_size(c.max_shard_size)
    except ValueError as e:  # the CLI's rule (--max-shard-size), worded with the recipe's key
        raise InputError(f"{r.path}: [convert] max_shard_size: {e}") from None


def check_text_source(r: Recipe, where: str, source: str) -> None:
    if source.startswith("hf:") and not 3 <= len(source.split(":")) - 1 <= 4:
        raise InputError(f"{r.path}: {where} = {source!r}: expected "
                         "hf:DATASET[:CONFIG]:SPLIT:FIELD")


def check_calibration(r: Recipe) -> None:
    check_text_source(r, "[calibration] source", r.calibration.source)


def check_variants(r: Recipe) -> None:
    if not r.variants:
        raise InputError(f"{r.path}: no [[variants]]; at least the one on branch \"main\" is needed")
    seen: dict[str, int] = {}
    for i, v in enumerate(r.variants, 1):
        where = f"[[variants]] #{i} ({v.branch})"
        problems = [
            (v.nsamples < MIN_NSAMPLES, f"nsamples = {v.nsamples}: must be at least {MIN_NSAMPLES}"),
            (v.seqlen < MIN_SEQLEN, f"seqlen = {v.seqlen}: must be at least {MIN_SEQLEN}"),
            (v.seed < 0, f"seed = {v.seed}: must not be negative"),
            (not valid_branch(v.branch),
             f"branch = {v.branch!r}: use up to 100 letters, digits, '.', '_', '-' (starting with "
             "a letter or digit, no '..', not ending in '.' or '.lock')"),
            (v.branch in seen, f"branch {v.branch!r} is also used by [[variants]] #{seen.get(v.branch)}"),
        ]
        for bad, message in problems:
            if bad:
                raise InputError(f"{r.path}: {where}: {message}")
        check_text_source(r, f"{where} calibration", v.calibration)
        seen[v.branch] = i
    if "main" not in seen:
        raise InputError(f"{r.path}: no variant has branch = \"main\"; mark the default variant "
                         "(usually 4-bit, 128g, act_order = false) with branch = \"main\"")


def check_verify(r: Recipe) -> None:
    v = r.verify
    check_text_source(r, "[verify] eval", v.eval)
    unknown = [x for x in v.runtimes if x not in RUNTIMES]
    if unknown:
        raise InputError(f"{r.path}: [verify] runtimes: {', '.join(map(repr, unknown))} unknown "
                         f"(known: {', '.join(RUNTIMES)})")
    if v.seqlen < MIN_SEQLEN:
        raise InputError(f"{r.path}: [verify] seqlen = {v.seqlen}: must be at least "
                         f"{MIN_SEQLEN}")
    if v.max_windows is not None and v.max_windows < 1:
        raise InputError(f"{r.path}: [verify] max_windows = {v.max_windows}: must be at least 1")
    for kind, table in v.thresholds().items():
        for bits, value in table.items():
            where = f"{r.path}: [verify] {kind} {{ \"{bits}\" = {value} }}"
            if bits not in BITS:
                raise InputError(f"{where}: keys must be bit widths ({', '.join(map(str, BITS))})")
            problem = thresholds.invalid(kind, value)
            if problem:
                raise InputError(f"{where}: {problem}")
        missing = sorted({x.bits for x in r.variants} - set(table))
        if missing:
            raise InputError(f"{r.path}: [verify] {kind} has no entry for the "
                             f"{', '.join(map(str, missing))}-bit variant(s)")


def valid_branch(name: str) -> bool:
    """A branch the Hub and git take and that is a plain file name (git check-ref-format rules)."""
    return bool(BRANCH.fullmatch(name)) and ".." not in name and not name.endswith((".", ".lock"))


def repo_problem(repo: str) -> str | None:
    """Why `repo` is not a Hub repository id OWNER/NAME (huggingface_hub's own rules), or None."""
    if repo.count("/") != 1:
        return "expected a repository id OWNER/NAME"
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        return str(e).split(":")[0].rstrip(".")
    return None


def check_publish(r: Recipe) -> None:
    p = r.publish
    if r.source.is_hf and p.fp16_repo:
        raise InputError(f"{r.path}: [publish] fp16_repo: an HF source is published as it is "
                         "(the cards name it); remove the key")
    if not r.source.is_hf and not p.fp16_repo:
        raise InputError(f"{r.path}: [publish] fp16_repo is required: the converted fp16 model "
                         "is published there")
    repos = [("gptq_repo", p.gptq_repo)] + ([("fp16_repo", p.fp16_repo)] if p.fp16_repo else [])
    for key, repo in repos + ([("gguf_repo", p.gguf_repo)] if p.gguf_repo else []):
        problem = repo_problem(repo)
        if problem:
            raise InputError(f"{r.path}: [publish] {key} = {repo!r}: {problem}")
    if p.fp16_repo == p.gptq_repo:
        raise InputError(f"{r.path}: [publish] fp16_repo and gptq_repo must differ "
                         "(GPTQ branches would overwrite the fp16 model)")
    if r.gguf and not p.gguf_repo:
        raise InputError(f"{r.path}: [[gguf]] files need [publish] gguf_repo (e.g. "
                         f"\"{p.gptq_repo.split('/')[0]}/{r.model.name}-GGUF\")")
    if p.gguf_repo and p.gguf_repo in (p.fp16_repo, p.gptq_repo):
        raise InputError(f"{r.path}: [publish] gguf_repo must differ from fp16_repo and gptq_repo")


def check_gguf(r: Recipe) -> None:
    seen: dict[str, int] = {}
    for i, g in enumerate(r.gguf, 1):
        where = f"{r.path}: [[gguf]] #{i}"
        if g.type not in TYPES:
            raise InputError(f"{where}: type = {g.type!r}: must be one of "
                             f"{', '.join(TYPES)}")
        if g.type in seen:
            raise InputError(f"{where}: type {g.type!r} is also [[gguf]] #{seen[g.type]}")
        seen[g.type] = i
        if TYPES[g.type].needs_imatrix and not g.imatrix:
            raise InputError(f"{where} ({g.type}): imatrix = false: {g.type} needs an importance "
                             "matrix (unusable without one); remove the key")
        for kind, value in g.thresholds().items():
            problem = thresholds.invalid(kind, value)
            if problem:
                raise InputError(f"{where} ({g.type}): {problem}")


def check_scale(r: Recipe) -> None:
    res, s = r.resources, r.slurm
    tasks = [(f"[resources] {name}", t) for name, t in res.tasks.items()]
    for where, t in tasks:
        if t.cpus is not None and t.cpus < 1:
            raise InputError(f"{r.path}: {where} cpus = {t.cpus}: must be at least 1")
        if t.gpus is not None and t.gpus < 0:
            raise InputError(f"{r.path}: {where} gpus = {t.gpus}: must not be negative")
    for where, value, least in (("[resources] retries", res.retries, 0),
                                ("[slurm] time_min", s.time_min, 1), ("[slurm] mem_gb", s.mem_gb, 0)):
        if value < least:
            raise InputError(f"{r.path}: {where} = {value}: must be at least {least}")


CHECKS = (check_model, check_source, check_convert, check_calibration, check_variants,
          check_verify, check_publish, check_gguf, check_scale)
