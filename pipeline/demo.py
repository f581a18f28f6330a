"""`python -m pipeline demo`: run recipes/demo.toml end to end, with a dry-run publish, on the
tiny CodeLlama-shaped model shipped in recipes/demo/ (`--retrain` trains it again).

The model has CodeLlama's shape at toy size: grouped-query attention, RoPE θ = 1e6, two
model-parallel shards in Meta's on-disk format (bf16 consolidated.*.pth, params.json, a
SentencePiece tokenizer.model trained with Llama's normaliser settings), trained on the Python
standard library. Held-out standard-library packages are the evaluation text; the calibration
text comes from packages seen in training. It is trained once and committed, because float32
training gives different weights on different CPUs: the shipped bytes are the same everywhere.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import __version__
from pipeline.core.bounded import read_json
from pipeline.core.errors import InputError
from pipeline.core.output import staged_dir
from pipeline.core.paths import PATH

SETTINGS_NAME = "settings.json"
# Directories of the standard library that are not ordinary source: tests, data tables, docs.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                       "__pycache__", "lib-dynload", "pydoc_data", "encodings", "turtledemo",
                       "ensurepip"})


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo model; its hash keys the cache."""

    dim: int = 256                  # a multiple of 256, llama.cpp's K-quant super-block
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    multiple_of: int = 256          # FFN width 768: every group size (32/64/128) and 256 divide it
    vocab_size: int = 2048
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    n_shards: int = 2
    seqlen: int = 256
    batch: int = 16
    steps: int = 600
    lr: float = 1e-2
    warmup: int = 40
    weight_decay: float = 0.1
    seed: int = 0
    tokenizer_chars: int = 4_000_000
    eval_packages: tuple[str, ...] = ("json", "http")
    calib_packages: tuple[str, ...] = ("logging", "concurrent", "collections")

    def params(self) -> dict[str, Any]:
        """Meta's params.json for this model."""
        return {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
                "multiple_of": self.multiple_of, "ffn_dim_multiplier": None,
                "norm_eps": self.norm_eps, "rope_theta": self.rope_theta}


def stdlib_split(root: Path, settings: DemoSettings) -> dict[str, list[Path]]:
    """The standard library's .py files: `train` (all but the eval packages), `calib` (some
    training packages) and `eval` (held-out packages, never seen in training)."""
    split: dict[str, list[Path]] = {"train": [], "calib": [], "eval": []}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if any(d in SKIP_DIRS or d.startswith("config-") for d in parts[:-1]):
            continue
        top = parts[0] if len(parts) > 1 else ""
        if top in settings.eval_packages:
            split["eval"].append(p)
            continue
        split["train"].append(p)
        if top in settings.calib_packages:
            split["calib"].append(p)
    for name, files in split.items():
        if not files:
            raise InputError(f"{root}: no standard-library files for the demo's {name} split "
                             f"(eval packages {settings.eval_packages}, calibration packages "
                             f"{settings.calib_packages})")
    return split


def read_source(files: list[Path]) -> list[str]:
    """Text of each file (files that are not UTF-8 are skipped)."""
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, max_chars: int) -> bytes:
    """A SentencePiece BPE model (serialised) with Llama's settings: identity normalisation,
    whitespace kept, digits split, byte fallback, ids unk 0 / bos 1 / eos 2."""
    import sentencepiece as spm

    def lines():
        n = 0
        for text in texts:
            for line in text.splitlines():
                if line.strip() and n < max_chars:
                    n += len(line)
                    yield line

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.99995, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=2, minloglevel=2)
    return model.getvalue()


def token_stream(texts: list[str], tokenizer_model: bytes) -> torch.Tensor:
    """All texts as one id stream [N] (int32), each document starting with BOS."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model)
    ids: list[int] = []
    for doc in sp.encode(texts):
        ids.append(sp.bos_id())
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.int32)


def init_weights(model: torch.nn.Module, n_layers: int) -> None:
    """GPT-2 style: N(0, 0.02), residual projections (wo, w2) scaled by 1/sqrt(2·n_layers)."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)


def train(settings: DemoSettings, tokens: torch.Tensor, eval_tokens: torch.Tensor | None = None,
          progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train MetaTransformer on random windows of `tokens`; returns its Meta-named float32 state
    and a log (losses, held-out loss, seconds)."""
    from verify.meta_reference import MetaTransformer

    s = settings
    if len(tokens) <= s.seqlen + 1:
        raise InputError(f"demo training text has {len(tokens)} tokens; need more than {s.seqlen + 1}")
    torch.manual_seed(s.seed)
    model = MetaTransformer(s.params())
    init_weights(model, s.n_layers)
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(s.seed)
    offsets = torch.arange(s.seqlen + 1)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(s.steps), desc="train demo model", unit="step", file=sys.stderr,
               disable=not progress)
    for step in bar:
        lr = s.lr * min(1.0, (step + 1) / s.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / s.steps))  # cosine to 10%
        for group in opt.param_groups:
            group["lr"] = lr
        start = torch.randint(0, len(tokens) - s.seqlen - 1, (s.batch,), generator=g)
        x = tokens[start[:, None] + offsets].long()  # [B, T+1]
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    log: dict[str, Any] = {"steps": s.steps, "seconds": round(time.perf_counter() - t0, 1),
                           "train_tokens": s.steps * s.batch * s.seqlen,
                           "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
                           "losses": [round(x, 4) for x in losses]}
    if eval_tokens is not None and len(eval_tokens) > s.seqlen:
        log["eval_loss"] = round(held_out_loss(model, eval_tokens, s.seqlen), 4)
    return {k: v.detach() for k, v in model.state_dict().items()}, log


@torch.inference_mode()
def held_out_loss(model: torch.nn.Module, tokens: torch.Tensor, seqlen: int,
                  max_windows: int = 32) -> float:
    """Mean next-token loss over non-overlapping windows of held-out text."""
    n = min(max_windows, len(tokens) // seqlen)
    x = tokens[: n * seqlen].long().view(n, seqlen)
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()


def copy_text(files: list[Path], root: Path, out: Path) -> None:
    """Copy files into one flat directory, named after their path in the standard library plus
    .txt (they are text for the model, not this project's code)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, out / (".".join(f.relative_to(root).parts) + ".txt"))


def demo_layout(recipe) -> tuple[Path, dict[str, Path]]:
    """The shipped model's root and where the demo recipe expects the checkpoint and the text."""
    meta = Path(recipe.source.path)
    root = meta.parent
    parts = {"meta": meta, "calib": Path(recipe.calibration.source), "eval": Path(recipe.verify.eval)}
    for name, path in parts.items():
        if root not in path.parents:
            raise InputError(f"{recipe.path}: the demo's {name} path {path} must lie under {root}")
    return root, parts


def shipped_model(recipe) -> dict[str, Any]:
    """The settings.json of the committed demo model; InputError when any part is missing."""
    root, parts = demo_layout(recipe)
    info_file = root / SETTINGS_NAME
    missing = [str(p) for p in (info_file, parts["meta"] / "params.json", *parts.values())
               if not p.exists()]
    if missing:
        raise InputError(f"{root}: the shipped demo model is incomplete (missing "
                         f"{', '.join(missing)}); restore it with git or regenerate it with "
                         "`python -m pipeline demo --retrain`")
    return read_json(info_file)


def retrain_model(recipe, settings: DemoSettings, stdlib: Path | None = None) -> dict[str, Any]:
    """Train the demo model on this machine's standard library and replace the shipped one
    (recipes/demo/, to be committed); returns its settings.json content."""
    root, parts = demo_layout(recipe)
    if root.exists() and not (root / SETTINGS_NAME).is_file():
        raise InputError(f"{root}: exists but holds no {SETTINGS_NAME}, so it is not a demo model "
                         "this tool wrote; move it away first")
    from pipeline.core.meta import write_meta_checkpoint

    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    split = stdlib_split(stdlib, settings)
    texts = {name: read_source(files) for name, files in split.items()}
    click.echo(f"demo: training a tokenizer on {len(texts['train'])} standard-library files "
               f"({stdlib})", err=True)
    tok_model = train_tokenizer(texts["train"], settings.vocab_size, settings.tokenizer_chars)
    train_ids = token_stream(texts["train"], tok_model)
    eval_ids = token_stream(texts["eval"], tok_model)
    state, log = train(settings, train_ids, eval_ids)
    info = {"settings": dataclasses.asdict(settings), "tool_version": __version__,
            "python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__,
            "files": {k: len(v) for k, v in split.items()}, "train_stream_tokens": len(train_ids),
            "train": {k: v for k, v in log.items() if k != "losses"}}
    with staged_dir(root, force=True, manifest=SETTINGS_NAME) as tmp:
        (tmp / "tokenizer.model").write_bytes(tok_model)
        write_meta_checkpoint(tmp / parts["meta"].relative_to(root), settings.params(), state,
                              settings.n_shards, tmp / "tokenizer.model")
        (tmp / "tokenizer.model").unlink()
        for name in ("calib", "eval"):
            copy_text(split[name], stdlib, tmp / parts[name].relative_to(root))
        (tmp / "train_log.json").write_text(json.dumps(log) + "\n")
        (tmp / SETTINGS_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_demo(*, workdir: Path | None = None, retrain: bool = False,
             settings: DemoSettings = DemoSettings(), device: str = "auto",
             force: bool = False) -> dict[str, Any]:
    """Run the demo recipe's job (dry-run publish) on the shipped model, retrained first when
    asked."""
    from pipeline.job import run_job
    from pipeline.recipe import RECIPES_DIR, load_recipe

    recipe = load_recipe(RECIPES_DIR / "demo.toml")
    t0 = time.perf_counter()
    model = retrain_model(recipe, settings) if retrain else shipped_model(recipe)
    train_s = time.perf_counter() - t0
    job = run_job(recipe, workdir=workdir, dry_run=True, device=device, force=force)
    return {"model": {**model, "retrained": retrain}, "model_seconds": round(train_s, 1),
            "job": job}


@click.command("demo")
@click.option("--workdir", type=PATH, default=None,
              help="Job work directory [default: work/demo].")
@click.option("--retrain", is_flag=True,
              help="Train the demo model again (minutes) and replace the shipped recipes/demo/.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps, with --retrain.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Recompute every stage of the job.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
def command(workdir: Path | None, retrain: bool, steps: int | None, device: str, force: bool,
            as_json: bool) -> None:
    """Run recipes/demo.toml end to end on the shipped tiny CodeLlama (or retrain it first)."""
    from pipeline.run import render_summary

    if steps is not None and not retrain:
        raise InputError("--steps applies only with --retrain")
    settings = DemoSettings() if steps is None else DemoSettings(steps=steps)
    result = run_demo(workdir=workdir, retrain=retrain, settings=settings, device=device,
                      force=force)
    model, job = result["model"], result["job"]
    how = f"retrained in {result['model_seconds']:.0f}s" if retrain else "shipped"
    lines = [f"demo model ({how}): {model['train']['train_tokens']} training tokens, final loss "
             f"{model['train']['final_loss']}, held-out loss {model['train'].get('eval_loss')}",
             render_summary(job)]
    text = "\n".join(lines)
    if as_json:
        click.echo(text, err=True)
        click.echo(json.dumps(result))
    else:
        click.echo(text)
