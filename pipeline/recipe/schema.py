"""The recipe's schema: one dataclass per TOML table, whose fields are the table's keys and whose
annotations the allowed types, validated by pydantic in strict mode (a string is never a number,
nor a number a boolean); every error names the recipe file and the key."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_type_hints

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      create_model)

from pipeline.core import chat
from pipeline.core.bounded import DEFAULT_SHARD_SIZE, existing_dir, path_problem
from pipeline.core.calibration import NSAMPLES, SEED, SEQLEN
from pipeline.core.dtypes import DEFAULT_DTYPE
from pipeline.core.errors import InputError
from pipeline.methods import QuantSpec, SpecError
from verify import thresholds


def bit_widths(value: Any) -> Any:
    """A threshold table's TOML keys ("4") as bit widths; any other key is left for the error."""
    if isinstance(value, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
    return value


BitTable = Annotated[dict[int, float], BeforeValidator(bit_widths)]  # bit width -> value
RecipePath = Annotated[Path, Strict(False)]  # a TOML string, as a path


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
    original_card: RecipePath | None = None
    original_card_text: str = field(default="", repr=False, metadata={"internal": True})


SOURCE_FORMATS = ("meta", "hf")  # Meta's original checkpoint (converted first), or an HF model


@dataclass(frozen=True)
class Source:
    """The model the job starts from: Meta's original checkpoint (`format = "meta"`, converted
    first) or a Llama-architecture HF model (`format = "hf"`, quantised as it is): a path, an
    environment variable holding one, or (hf) a Hub repository at a revision."""

    format: str = "meta"
    path: RecipePath | None = None
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


# One key per threshold kind, from verify/thresholds.py's tables (the one source): [verify] takes
# a table per kind (bit width -> value), a [[gguf]] entry one value per GGUF kind.
BitTables = dataclasses.make_dataclass(
    "BitTables", [(kind, BitTable, field(default_factory=dict)) for kind in thresholds.KINDS],
    frozen=True, kw_only=True)
GGUFThresholds = dataclasses.make_dataclass(
    "GGUFThresholds", [(kind, float | None, field(default=None)) for kind in thresholds.GGUF_KINDS],
    frozen=True, kw_only=True)


@dataclass(frozen=True)
class VerifyOptions(BitTables):
    """Evaluation text and thresholds for the verify stage: one table per verify/thresholds.py
    KINDS entry (BitTables), bit width -> value over its defaults (what each bounds is described
    there)."""

    eval: str
    seqlen: int = 2048
    max_windows: int | None = None
    baseline_rtn: bool = False
    prompts: list[str] = field(default_factory=list)
    chat_prompts: list[str] = field(default_factory=list)  # user messages, in the chat template
    runtimes: list[str] = field(default_factory=list)  # verify/runtimes.py RUNTIMES names

    def thresholds(self) -> dict[str, dict[int, float]]:
        """The threshold tables the recipe sets (kind → bits → value), for verify.stage."""
        return {kind: getattr(self, kind) for kind in thresholds.KINDS if getattr(self, kind)}


@dataclass(frozen=True)
class GGUFFile(GGUFThresholds):
    """One file of the GGUF repository: its type (pipeline/core/gguf_types.py TYPES), the card's
    use case (default: the type's), and thresholds over the type's defaults (GGUFThresholds)."""

    type: str
    description: str = ""
    imatrix: bool = True  # quantised with the importance matrix of [calibration] (not F16)

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


def table_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a TOML table may set (not those the loader fills in)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


@functools.cache
def table_model(cls: type) -> type[BaseModel]:
    """The pydantic model of dataclass `cls`'s table: its fields, strictly typed, its defaults."""
    hints = get_type_hints(cls, include_extras=True)
    fields: dict[str, Any] = {}
    for f in table_fields(cls):
        if f.default is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], f.default)
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (hints[f.name], ...)
    return create_model(f"{cls.__name__}Table", __config__=ConfigDict(strict=True), **fields)


# what a key must be, by pydantic's error type
EXPECTED = {"int_type": "an integer", "bool_type": "true or false", "float_type": "a number",
            "string_type": "a string", "path_type": "a path (string)", "list_type": "a list of strings",
            "dict_type": 'a table such as { "4" = 0.05 }'}


def worded(error: dict[str, Any], table: dict[str, Any], path: Path, where: str) -> str:
    """One pydantic error as the recipe's message: the file, the table and key, what the key must
    be and what it is."""
    loc, kind = error["loc"], error["type"]
    key = loc[0]
    if kind == "missing":
        return f"{path}: {where}: missing required key {key!r}"
    value, expected = error["input"], EXPECTED.get(kind, error["msg"])
    if len(loc) > 1 and isinstance(table.get(key), list):  # an item of a list
        value, expected = table[key], "a list of strings"
    elif loc[-1] == "[key]":  # a threshold table's key
        return f'{path}: {where} {key}: key {loc[1]!r} must be a bit width such as "4"'
    elif len(loc) > 1:  # a threshold table's value
        key = f"{key}.{loc[1]}"
    return f"{path}: {where} {key} must be {expected}, got {type(value).__name__} {value!r}"


def build(cls: type, table: dict[str, Any], path: Path, where: str,
          given: set[str] | None = None) -> Any:
    """An instance of dataclass `cls` from a TOML table: unknown keys (of those `given`), missing
    keys and wrong types are errors; a key not in the table keeps the dataclass's default."""
    names = {f.name for f in table_fields(cls)}
    unknown = sorted(set(given if given is not None else table) - names)
    if unknown:
        raise InputError(f"{path}: {where}: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(names))})")
    try:
        m = table_model(cls).model_validate({k: v for k, v in table.items() if k in names})
    except ValidationError as e:
        raise InputError(worded(e.errors()[0], table, path, where)) from None
    return cls(**{k: getattr(m, k) for k in m.model_fields_set})


def build_resources(table: dict[str, Any], path: Path) -> Resources:
    """[resources]: its own keys (retries), and every other one a stage's task requests."""
    own = {f.name for f in dataclasses.fields(Resources)}
    res = build(Resources, {k: v for k, v in table.items() if k in own}, path, "[resources]")
    tasks = {}
    for k, v in table.items():
        if k in own:
            continue
        if not isinstance(v, dict):
            raise InputError(f"{path}: [resources] {k} must be a table such as {{ cpus = 2 }}, "
                             f"got {type(v).__name__} {v!r}")
        tasks[k] = build(TaskResources, v, path, f"[resources] {k}")
    return dataclasses.replace(res, tasks=tasks)


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


def build_recipe(path: Path, raw: dict[str, Any]) -> Recipe:
    """The dataclasses of the merged TOML tables, each table validated against its schema."""
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
    return recipe
