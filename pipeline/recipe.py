"""Recipes: recipes/NAME.toml → `Recipe` dataclasses, validated once so every stage can trust them.

The dataclasses are the schema: a TOML table's keys are a dataclass's fields, their annotations
the allowed types. A recipe may `extends = "BASE.toml"`: its tables are merged key by key over
the base's (`[[variants]]` replaces the base's list as a whole). Relative paths are resolved
against the directory of the file that wrote them.

Confinement: a recipe alone must not make the pipeline read arbitrary files into anything it
writes or uploads. Every path a recipe file names (`extends`, [model] original_card, [source]
path, local calibration/eval sources), and every file such a directory or glob holds, must
resolve (symlinks and `..` followed) inside that file's own folder or a folder the user allows
(`allow_dirs`: `--allow-dir DIR`, or $PIPELINE_ALLOW_DIRS, a PATH-style list). `[source] env`
is the user's own choice and is not confined. The original card must also be a regular UTF-8
text file of at most MAX_CARD_BYTES; its text is read once, here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import click
from huggingface_hub.utils import HFValidationError, validate_repo_id

from pipeline.core.dtypes import DEFAULT_DTYPE, STORAGE_DTYPES
from pipeline.core import chat
from pipeline.core.bounded import (DEFAULT_SHARD_SIZE, checked_path, existing_dir, parse_size,
                                   path_problem, read_bytes, read_toml, shown)
from pipeline.core.calibration import (MIN_NSAMPLES, MIN_SEQLEN, NSAMPLES, SEED, SEQLEN, glob_paths,
                                       glob_root)
from pipeline.core.errors import InputError
from pipeline.core.gguf_types import TYPES
from pipeline.core.gptq_layout import BITS
from pipeline.core.paths import PATH
from pipeline.methods import QuantSpec, SpecError
from verify import thresholds
from verify.runtimes import RUNTIMES

# a branch (git's ref rules, narrowed to what the Hub and file names take) and a model name (a
# plain file name: it names GGUF files and repositories); re.ASCII: \w is [A-Za-z0-9_]
BRANCH = re.compile(r"[A-Za-z0-9][\w.-]{0,99}", re.ASCII)
MODEL_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
REVISION = re.compile(r"[A-Za-z0-9][\w./-]{0,199}", re.ASCII)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}", re.ASCII)
ALLOW_ENV = "PIPELINE_ALLOW_DIRS"  # folders (os.pathsep-separated) recipes may name besides their own
MAX_CARD_BYTES = 256 * 1024  # [model] original_card: a model card, not a data file


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model, for repository names and model cards."""

    name: str
    creator: str = "Meta"
    license: str = ""
    base_model: str = ""
    chat_format: str = "none"  # pipeline/core/chat.py: the tokenizer's chat template, stop tokens, card
    prompt_template: str | None = None  # only with chat_format "none"; else derived, always filled
    description: str = ""
    original_card: Path | None = None
    original_card_text: str = field(default="", repr=False, metadata={"internal": True})


SOURCE_FORMATS = ("meta", "hf")  # Meta's original checkpoint (converted first), or an HF model


@dataclass(frozen=True)
class Source:
    """The model the job starts from: Meta's original checkpoint (`format = "meta"`, converted
    first) or a Llama-architecture HF model (`format = "hf"`, quantised as it is): a path, an
    environment variable holding one, or (hf) a Hub repository at a revision."""

    format: str = "meta"
    path: Path | None = None
    env: str | None = None
    repo: str | None = None
    revision: str = "main"
    recipe: Path | None = field(default=None, metadata={"internal": True})

    @property
    def is_hf(self) -> bool:
        return self.format == "hf"

    def resolve(self) -> Path | None:
        """The local model directory; None for a Hub repository (downloaded by the job).
        InputError when the variable is unset or the path missing."""
        if self.repo is not None:
            return None
        expected = ("one holding config.json and *.safetensors" if self.is_hf
                    else "one holding params.json and consolidated.*.pth")
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise InputError(f"{self.recipe}: [source] env = {self.env!r}, but ${self.env} "
                                 f"is not set; export {self.env}=/path/to/the/model")
            path = Path(value).expanduser()
            if path_problem(path) or not path.is_dir():  # its value is never shown: it may be a secret
                raise InputError(f"{self.recipe}: [source] env = {self.env!r}: ${self.env} does not "
                                 f"name a directory (expected {expected}; its value is not shown)")
            return path
        return existing_dir(self.path, f"{self.recipe}: [source] path")

    def describe(self) -> dict[str, str]:
        """What the cards and job.json say the job started from (never an env variable's value)."""
        if self.repo is not None:
            return {"format": self.format, "repo": self.repo, "revision": self.revision}
        if self.env is not None:
            return {"format": self.format, "env": self.env}
        return {"format": self.format, "path": Path(self.path).name}


@dataclass(frozen=True)
class ConvertOptions:
    """Options of the convert stage."""

    dtype: str = DEFAULT_DTYPE
    max_shard_size: str = DEFAULT_SHARD_SIZE
    skip_checksums: bool = False


@dataclass(frozen=True)
class Calibration:
    """Calibration defaults for every variant (glob, directory or hf:DATASET[:CONFIG]:SPLIT:FIELD)."""

    source: str
    nsamples: int = NSAMPLES
    seqlen: int = SEQLEN
    seed: int = SEED


@dataclass(frozen=True)
class Variant(QuantSpec):
    """One GPTQ artifact, published on its own branch: a pipeline.methods QuantSpec (its fields are
    the table's quantisation keys, validated there as for the CLI) plus the branch, a description
    and the calibration, whose fields are always filled."""

    branch: str = ""
    description: str = ""
    calibration: str = ""
    nsamples: int = NSAMPLES
    seqlen: int = SEQLEN
    seed: int = SEED


def default_branch(bits: int, group_size: int, act_order: bool) -> str:
    """The branch name quantisers use: gptq-4bit-32g-actorder_True (group −1 written -1)."""
    return f"gptq-{bits}bit-{group_size}g-actorder_{act_order}"


@dataclass(frozen=True)
class VerifyOptions:
    """Evaluation text and thresholds for the verify stage. Each threshold table maps bit width →
    value, overriding verify/thresholds.py's defaults (what each bounds is described there)."""

    eval: str
    seqlen: int = 2048
    max_windows: int | None = None
    rtn_margin: dict[int, float] = field(default_factory=dict)
    tolerance: dict[int, float] = field(default_factory=dict)  # allowed ppl ratio − 1
    kl_mean: dict[int, float] = field(default_factory=dict)
    kl_p99: dict[int, float] = field(default_factory=dict)
    top1: dict[int, float] = field(default_factory=dict)
    agreement: dict[int, float] = field(default_factory=dict)
    module_error: dict[int, float] = field(default_factory=dict)
    module_output_error: dict[int, float] = field(default_factory=dict)
    baseline_rtn: bool = False
    prompts: list[str] = field(default_factory=list)
    chat_prompts: list[str] = field(default_factory=list)  # user messages, in the chat template
    runtimes: list[str] = field(default_factory=list)  # verify/runtimes.py RUNTIMES names

    def thresholds(self) -> dict[str, dict[int, float]]:
        """The threshold tables the recipe sets (kind → bits → value), for verify.stage."""
        return {kind: getattr(self, kind) for kind in thresholds.KINDS if getattr(self, kind)}


@dataclass(frozen=True)
class GGUFFile:
    """One file of the GGUF repository: its type (pipeline/gguf.py TYPES), the card's use case
    (default: the type's), and thresholds over verify/thresholds.py's GGUF defaults for it."""

    type: str
    description: str = ""
    tolerance: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1: float | None = None

    def thresholds(self) -> dict[str, float]:
        """The thresholds this entry sets (kind → value), for verify.stage."""
        return {k: getattr(self, k) for k in thresholds.GGUF_KINDS if getattr(self, k) is not None}


@dataclass(frozen=True)
class PublishOptions:
    """Target repositories (fp16, GPTQ with one branch per variant, GGUF with one file per type
    on main) and card fields."""

    gptq_repo: str
    fp16_repo: str = ""  # required for a Meta source; an HF source is the fp16 model already
    gguf_repo: str = ""  # required with [[gguf]] entries
    private: bool = False
    quantized_by: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskResources:
    """What one task of a stage asks of `--executor ray|slurm`; `cpus` is also its torch thread
    count (floating-point sums depend on it: same hardware and threads, same bytes)."""

    cpus: int | None = None  # default: the job's (pipeline/job.py default_cpus), local or not
    gpus: int | None = None  # default: 1 for a stage on the device (Stage.gpu) on CUDA, else 0


@dataclass(frozen=True)
class Resources:
    """[resources]: the task requests of a stage on a cluster, by stage name (`quantize = { cpus
    = 4 }`; the names are checked against the job's table, pipeline/job.py check_resources), and
    how often the engine runs again a task whose worker died."""

    tasks: dict[str, TaskResources] = field(default_factory=dict, metadata={"internal": True})
    retries: int = 2

    def task(self, stage: str) -> TaskResources:
        """The requests of one task of `stage` (the defaults when the recipe names none)."""
        return self.tasks.get(stage, TaskResources())


@dataclass(frozen=True)
class SlurmOptions:
    """[slurm]: where `--executor slurm` submits each task (CPUs and GPUs: [resources])."""

    partition: str = ""
    account: str = ""
    time_min: int = 60  # per task
    mem_gb: int = 0  # 0: the partition's default


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: what to convert, which variants to quantise, how to verify and publish."""

    path: Path
    model: ModelInfo
    source: Source
    convert: ConvertOptions
    calibration: Calibration
    variants: list[Variant]
    verify: VerifyOptions
    publish: PublishOptions
    gguf: list[GGUFFile] = field(default_factory=list)
    resources: Resources = Resources()
    slurm: SlurmOptions = SlurmOptions()
    allow_dirs: tuple[Path, ...] = ()  # the folders it was loaded with (a worker loads it again)
    digest: str = ""  # sha256 of the merged tables: a worker refuses a recipe that changed since

    @property
    def name(self) -> str:
        """The recipe's file stem: names the job's work directory."""
        return self.path.stem

    def variant(self, branch: str) -> Variant:
        for v in self.variants:
            if v.branch == branch:
                return v
        known = ", ".join(v.branch for v in self.variants)
        raise InputError(f"{self.path}: no variant {branch!r} (variants: {known})")


# section -> dataclass; `variants` and `gguf` are arrays of tables, the others are tables.
SECTIONS: dict[str, type] = {
    "model": ModelInfo, "source": Source, "convert": ConvertOptions,
    "calibration": Calibration, "variants": Variant, "verify": VerifyOptions,
    "publish": PublishOptions, "gguf": GGUFFile, "resources": Resources, "slurm": SlurmOptions,
}
ARRAYS = ("variants", "gguf")
OPTIONAL_SECTIONS: dict[str, Any] = {"convert": {}, "gguf": [], "resources": {}, "slurm": {}}

# keys holding paths, resolved against the directory of the file that wrote them
# (section, key, is_text_source: "hf:…" sources are left alone)
PATH_KEYS = (("model", "original_card", False), ("source", "path", False),
             ("calibration", "source", True), ("variants", "calibration", True),
             ("verify", "eval", True))


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(name: str | Path) -> Path:
    """A recipe path, or a name in recipes/ (`codellama-34b` → recipes/codellama-34b.toml), looked
    up in ./recipes and then beside the package."""
    name = checked_path(name, "recipe")
    candidates = [name] if name.suffix == ".toml" or name.is_file() else []
    candidates += [d / f"{name}.toml" for d in (Path("recipes"), RECIPES_DIR)]
    for path in candidates:
        if path.is_file():
            return path
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml") if not p.name.startswith("_"))
    raise InputError(f"{name}: no such recipe file, nor recipes/{name}.toml "
                     f"(shipped: {', '.join(names)})")


def load_recipe(path: Path | str, allow_dirs: Sequence[Path | str] = ()) -> Recipe:
    """Read, merge (`extends`) and validate a recipe; InputError names the file and the key.
    Paths it names must lie in its own folder, one of `allow_dirs` or one in $PIPELINE_ALLOW_DIRS."""
    path = checked_path(path, "recipe").resolve()
    allowed = allowed_dirs(allow_dirs)
    raw = read_merged(path, (), allowed)
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    return dataclasses.replace(build_recipe(path, raw), allow_dirs=allowed, digest=digest)


allow_dir_option = click.option(
    "--allow-dir", "allow_dirs", multiple=True, type=PATH,
    help=f"A folder the recipe may name files in besides its own (repeatable; also ${ALLOW_ENV}).")


def allowed_dirs(given: Sequence[Path | str]) -> tuple[Path, ...]:
    """The folders the user allows recipes to name: `given` plus $PIPELINE_ALLOW_DIRS, resolved."""
    env = [d for d in os.environ.get(ALLOW_ENV, "").split(os.pathsep) if d]
    dirs = [checked_path(Path(d).expanduser(), f"--allow-dir / ${ALLOW_ENV}").resolve()
            for d in (*given, *env)]
    for d in dirs:
        if not d.is_dir():
            raise InputError(f"--allow-dir / ${ALLOW_ENV}: {d} is not a directory")
    return tuple(dirs)


def read_merged(path: Path, stack: tuple[Path, ...], allowed: tuple[Path, ...]) -> dict[str, Any]:
    """The recipe file's tables merged over those of the file it extends (recursively)."""
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise InputError(f"{path}: `extends` cycle: {chain}")
    if not path.is_file():
        where = f" (extended by {stack[-1]})" if stack else ""
        raise InputError(f"{path}: recipe file not found{where}")
    raw = read_toml(path)
    resolve_paths(raw, path, allowed)
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise InputError(f"{path}: extends must be a string (a recipe file name)")
    base_path = checked_path(path.parent / base_name, f"{path}: extends").resolve()
    check_confined(base_path, path, "extends", base_name, allowed)
    base = read_merged(base_path, (*stack, path), allowed)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def resolve_paths(raw: dict[str, Any], path: Path, allowed: tuple[Path, ...]) -> None:
    """Make the path keys of recipe file `path`'s tables absolute (in place), relative to its
    folder, and confined (see the module docstring)."""
    for section, key, is_text in PATH_KEYS:
        tables = raw.get(section)
        tables = tables if isinstance(tables, list) else [tables]
        for t in tables:
            if not isinstance(t, dict) or not isinstance(t.get(key), str):
                continue
            value = t[key]
            if not (is_text and value.startswith("hf:")):
                where = f"[{section}] {key}" if section != "variants" else f"[[variants]] {key}"
                checked_path(value, f"{path}: {where} =")
                t[key] = os.path.normpath(path.parent / Path(value).expanduser())
                check_path_key(t[key], path, where, value, allowed)


def check_path_key(value: str, recipe: Path, key: str, given: str, allowed: tuple[Path, ...]) -> None:
    """Confine what an absolute path key reaches: the path itself (a glob: its fixed leading
    folder), then every file it holds or matches now (a superset of what the stages read)."""
    top, rest = glob_root(value)
    check_confined(top, recipe, key, given, allowed)
    if rest:
        found = glob_paths(value)
    else:
        found = list(top.rglob("*")) if os.path.isdir(top) else []
    for p in found:
        if p.is_file():
            check_confined(p, recipe, key, given, allowed)


def check_confined(target: Path, recipe: Path, key: str, value: str, allowed: tuple[Path, ...]) -> None:
    """InputError unless `target` (symlinks and `..` resolved) lies in the recipe file's folder or
    an allowed folder."""
    real = Path(os.path.realpath(target))
    roots = (recipe.parent.resolve(), *allowed)
    if not any(real.is_relative_to(root) for root in roots):
        via = "" if real == Path(os.path.normpath(target)) else f" (through {target})"
        raise InputError(f"{recipe}: {key} = {value!r} reaches {real}{via}, outside the recipe's "
                         f"folder {roots[0]}; recipes may name files only in their own folder: move "
                         f"it there, or allow its folder with --allow-dir DIR or ${ALLOW_ENV}")


def read_card(recipe: Path, card: Path) -> str:
    """The original card's text: a regular UTF-8 text file of at most MAX_CARD_BYTES (a FIFO is
    refused rather than waited on)."""
    where = f"{recipe}: [model] original_card = {str(card)!r}"
    try:
        text = read_bytes(card, MAX_CARD_BYTES, "model card (a short Markdown file)").decode("utf-8")
    except InputError as e:
        raise InputError(f"{where}: {str(e).removeprefix(f'{shown(card)}: ')}") from None
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise InputError(f"{where}: not UTF-8 text (a binary file?)")
    return text


def build_recipe(path: Path, raw: dict[str, Any]) -> Recipe:
    """Validated dataclasses from the merged TOML tables."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise InputError(f"{path}: unknown top-level key(s) {', '.join(unknown)} "
                         f"(known: extends, {', '.join(SECTIONS)})")
    for section in SECTIONS:
        if section not in raw and section not in OPTIONAL_SECTIONS:
            raise InputError(f"{path}: missing section [{section}]")
    sections = {s: raw.get(s, OPTIONAL_SECTIONS.get(s)) for s in SECTIONS}
    for s, table in sections.items():
        want = list if s in ARRAYS else dict
        if not isinstance(table, want):
            shape = f"an array of tables [[{s}]]" if want is list else f"a table [{s}]"
            raise InputError(f"{path}: {s} must be {shape}")

    model = with_prompt_template(build(ModelInfo, sections["model"], path, "[model]"), path)
    if model.original_card is not None:
        model = dataclasses.replace(model, original_card_text=read_card(path, model.original_card))
    source = build(Source, sections["source"], path, "[source]")
    source = dataclasses.replace(source, recipe=path)
    convert = build(ConvertOptions, sections["convert"], path, "[convert]")
    calibration = build(Calibration, sections["calibration"], path, "[calibration]")
    verify = build(VerifyOptions, sections["verify"], path, "[verify]")
    publish = build(PublishOptions, sections["publish"], path, "[publish]")
    defaults = {"calibration": calibration.source, "nsamples": calibration.nsamples,
                "seqlen": calibration.seqlen, "seed": calibration.seed}
    variants = []
    for i, table in enumerate(sections["variants"]):
        where = f"[[variants]] #{i + 1}"
        if not isinstance(table, dict):
            raise InputError(f"{path}: {where} must be a table")
        try:
            v = build(Variant, {**defaults, **table}, path, where, given=set(table))
        except SpecError as e:  # QuantSpec's rule, worded with the recipe's key
            shown = str(e.value).lower() if isinstance(e.value, bool) else repr(e.value)
            branch = f" ({table['branch']})" if isinstance(table.get("branch"), str) else ""
            raise InputError(f"{path}: {where}{branch}: {e.key} = {shown}: {e.rule}") from None
        if not v.branch:
            v = dataclasses.replace(v, branch=default_branch(v.bits, v.group_size, v.act_order))
        variants.append(v)

    ggufs = []
    for i, table in enumerate(sections["gguf"]):
        if not isinstance(table, dict):
            raise InputError(f"{path}: [[gguf]] #{i + 1} must be a table")
        ggufs.append(build(GGUFFile, table, path, f"[[gguf]] #{i + 1}"))

    recipe = Recipe(path, model, source, convert, calibration, variants, verify, publish, ggufs,
                    resources=build_resources(sections["resources"], path),
                    slurm=build(SlurmOptions, sections["slurm"], path, "[slurm]"))
    for check in CHECKS:
        check(recipe)
    return recipe


def build(cls: type, table: dict[str, Any], path: Path, where: str,
          given: set[str] | None = None) -> Any:
    """An instance of dataclass `cls` from a TOML table: unknown keys, missing keys and wrong
    types are errors."""
    hints = get_type_hints(cls)
    known = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    names = {f.name for f in known}
    unknown = sorted(set(given if given is not None else table) - names)
    if unknown:
        raise InputError(f"{path}: {where}: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(names))})")
    values = {}
    for f in known:
        if f.name in table:
            values[f.name] = coerce(table[f.name], hints[f.name], path, f"{where} {f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"{path}: {where}: missing required key {f.name!r}")
    return cls(**values)


def build_resources(table: dict[str, Any], path: Path) -> Resources:
    """[resources]: its own keys (retries), and every other one a stage's task requests."""
    own = {f.name for f in dataclasses.fields(Resources)}
    res = build(Resources, {k: v for k, v in table.items() if k in own}, path, "[resources]")
    return dataclasses.replace(res, tasks={
        k: coerce(v, TaskResources, path, f"[resources] {k}") for k, v in table.items()
        if k not in own})


def coerce(value: Any, hint: Any, path: Path, key: str) -> Any:
    """`value` as type `hint` (str, int, float, bool, Path, list[str], dict[int, float],
    optionals of those); InputError otherwise."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = get_origin(hint), get_args(hint)

    def fail(expected: str) -> InputError:
        return InputError(f"{path}: {key} must be {expected}, got {type(value).__name__} "
                          f"{value!r}")

    if origin is list:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise fail("a list of strings")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail('a table such as { "4" = 0.05 }')
        out = {}
        for k, v in value.items():
            if not re.fullmatch(r"\d+", k):
                raise InputError(f"{path}: {key}: key {k!r} must be a bit width such as \"4\"")
            out[int(k)] = coerce(v, float, path, f"{key}.{k}")
        return out
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise fail("a path (string)")
        return Path(value)
    if dataclasses.is_dataclass(hint):  # a table inside a table: [resources] quantize = { … }
        if not isinstance(value, dict):
            raise fail("a table such as { cpus = 2 }")
        return build(hint, value, path, key)
    raise TypeError(f"recipe schema: unsupported annotation {hint!r} for {key}")


def with_prompt_template(model: ModelInfo, path: Path) -> ModelInfo:
    """`model` with its prompt template: written by the recipe for chat_format "none" (default
    "{prompt}"), derived from the chat format otherwise, so card and tokenizer never disagree."""
    if model.chat_format not in chat.FORMATS:
        raise InputError(f"{path}: [model] chat_format = {model.chat_format!r}: must be one of "
                         f"{', '.join(chat.FORMATS)}")
    if model.chat_format != "none" and model.prompt_template is not None:
        raise InputError(f"{path}: [model] prompt_template is derived from chat_format = "
                         f"{model.chat_format!r}; remove it (or set chat_format = \"none\")")
    template = model.prompt_template
    if template is None:
        template = chat.prompt_template(model.chat_format)
    return dataclasses.replace(model, prompt_template=template)


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
