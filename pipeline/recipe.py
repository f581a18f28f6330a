"""Recipes: recipes/NAME.toml → `Recipe` dataclasses, validated once so every stage can trust them.

The dataclasses are the schema: a TOML table's keys are a dataclass's fields, their annotations
the allowed types. A recipe may `extends = "BASE.toml"`: its tables are merged key by key over
the base's (`[[variants]]` replaces the base's list as a whole). Relative paths are resolved
against the directory of the file that wrote them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from pipeline.errors import InputError

BITS = (2, 3, 4, 8)
DTYPES = ("float16", "bfloat16", "float32")
METHODS = ("gptq", "rtn")
SHARD_SIZE = re.compile(r"^\d+(\.\d+)?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
BRANCH = re.compile(r"^[A-Za-z0-9][\w.-]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model, for repository names and model cards."""

    name: str
    creator: str = "Meta"
    license: str = ""
    base_model: str = ""
    prompt_template: str = "{prompt}"
    description: str = ""
    original_card: Path | None = None


@dataclass(frozen=True)
class Source:
    """Where the original Meta checkpoint lies: a path, or an environment variable holding one."""

    path: Path | None = None
    env: str | None = None
    recipe: Path | None = field(default=None, metadata={"internal": True})

    def resolve(self) -> Path:
        """The checkpoint directory; InputError when the variable is unset or the path missing."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise InputError(f"{self.recipe}: [source] env = {self.env!r}, but ${self.env} "
                                 f"is not set; export {self.env}=/path/to/the/Meta/checkpoint")
            path, what = Path(value).expanduser(), f"${self.env}"
        else:
            path, what = self.path, "[source] path"
        if not path.is_dir():
            raise InputError(f"{self.recipe}: {what} = {str(path)!r} is not a directory "
                             "(expected params.json and consolidated.*.pth)")
        return path


@dataclass(frozen=True)
class ConvertOptions:
    """Options of the convert stage."""

    dtype: str = "float16"
    max_shard_size: str = "5GB"
    skip_checksums: bool = False


@dataclass(frozen=True)
class Calibration:
    """Calibration defaults for every variant (glob, directory or hf:DATASET[:CONFIG]:SPLIT:FIELD)."""

    source: str
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


@dataclass(frozen=True)
class Variant:
    """One GPTQ artifact, published on its own branch; calibration fields are always filled."""

    bits: int
    group_size: int = 128
    act_order: bool = False
    damp: float = 0.01
    sym: bool = True
    static_groups: bool = False
    true_sequential: bool = True
    mse: bool = False
    method: str = "gptq"
    branch: str = ""
    description: str = ""
    calibration: str = ""
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def quant_options(self) -> dict[str, Any]:
        """Keyword arguments of pipeline.gptq.QuantSpec."""
        keys = ("bits", "group_size", "act_order", "sym", "damp", "static_groups",
                "true_sequential", "mse", "method")
        return {k: getattr(self, k) for k in keys}


def default_branch(bits: int, group_size: int, act_order: bool) -> str:
    """The branch name quantisers use: gptq-4bit-32g-actorder_True (group −1 written -1)."""
    return f"gptq-{bits}bit-{group_size}g-actorder_{act_order}"


@dataclass(frozen=True)
class VerifyOptions:
    """Evaluation text and thresholds for the verify stage (tolerance: bits → allowed ppl ratio − 1)."""

    eval: str
    seqlen: int = 2048
    max_windows: int | None = None
    tolerance: dict[int, float] = field(default_factory=dict)
    baseline_rtn: bool = False
    prompts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PublishOptions:
    """Target repositories (fp16, and GPTQ with one branch per variant) and card fields."""

    fp16_repo: str
    gptq_repo: str
    private: bool = False
    quantized_by: str = ""
    tags: list[str] = field(default_factory=list)


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

    @property
    def name(self) -> str:
        """The recipe's file stem: names the job's work directory."""
        return self.path.stem

    @property
    def default_variant(self) -> Variant:
        """The variant published on `main`."""
        return self.variant("main")

    def variant(self, branch: str) -> Variant:
        for v in self.variants:
            if v.branch == branch:
                return v
        known = ", ".join(v.branch for v in self.variants)
        raise InputError(f"{self.path}: no variant {branch!r} (variants: {known})")


# section -> dataclass; `variants` is an array of tables, the others are tables.
SECTIONS: dict[str, type] = {
    "model": ModelInfo, "source": Source, "convert": ConvertOptions,
    "calibration": Calibration, "variants": Variant, "verify": VerifyOptions,
    "publish": PublishOptions,
}
OPTIONAL_SECTIONS = {"convert": {}}

# keys holding paths, resolved against the directory of the file that wrote them
# (section, key, is_text_source: "hf:…" sources are left alone)
PATH_KEYS = (("model", "original_card", False), ("source", "path", False),
             ("calibration", "source", True), ("variants", "calibration", True),
             ("verify", "eval", True))


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(name: str | Path) -> Path:
    """A recipe path, or a name in recipes/ (`codellama-34b` → recipes/codellama-34b.toml), looked
    up in ./recipes and then beside the package."""
    candidates = [Path(name)] if Path(name).suffix == ".toml" or Path(name).is_file() else []
    candidates += [d / f"{name}.toml" for d in (Path("recipes"), RECIPES_DIR)]
    for path in candidates:
        if path.is_file():
            return path
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml") if not p.name.startswith("_"))
    raise InputError(f"{name}: no such recipe file, nor recipes/{name}.toml "
                     f"(shipped: {', '.join(names)})")


def load_recipe(path: Path | str) -> Recipe:
    """Read, merge (`extends`) and validate a recipe; InputError names the file and the key."""
    path = Path(path).resolve()
    raw = read_merged(path, ())
    return build_recipe(path, raw)


def read_merged(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    """The recipe file's tables merged over those of the file it extends (recursively)."""
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise InputError(f"{path}: `extends` cycle: {chain}")
    if not path.is_file():
        where = f" (extended by {stack[-1]})" if stack else ""
        raise InputError(f"{path}: recipe file not found{where}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid TOML: {e}") from e
    resolve_paths(raw, path.parent)
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise InputError(f"{path}: extends must be a string (a recipe file name)")
    base = read_merged((path.parent / base_name).resolve(), (*stack, path))
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def resolve_paths(raw: dict[str, Any], root: Path) -> None:
    """Make the path keys of one file's tables absolute (in place), relative to `root`."""
    for section, key, is_text in PATH_KEYS:
        tables = raw.get(section)
        tables = tables if isinstance(tables, list) else [tables]
        for t in tables:
            if not isinstance(t, dict) or not isinstance(t.get(key), str):
                continue
            value = t[key]
            if not (is_text and value.startswith("hf:")):
                t[key] = os.path.normpath(root / Path(value).expanduser())


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
        want = list if s == "variants" else dict
        if not isinstance(table, want):
            shape = "an array of tables [[variants]]" if want is list else f"a table [{s}]"
            raise InputError(f"{path}: {s} must be {shape}")

    model = build(ModelInfo, sections["model"], path, "[model]")
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
        v = build(Variant, {**defaults, **table}, path, where, given=set(table))
        if not v.branch:
            v = dataclasses.replace(v, branch=default_branch(v.bits, v.group_size, v.act_order))
        variants.append(v)

    recipe = Recipe(path, model, source, convert, calibration, variants, verify, publish)
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
    raise TypeError(f"recipe schema: unsupported annotation {hint!r} for {key}")


def check_model(r: Recipe) -> None:
    if not r.model.name.strip():
        raise InputError(f"{r.path}: [model] name must not be empty")
    if "{prompt}" not in r.model.prompt_template:
        raise InputError(f"{r.path}: [model] prompt_template must contain {{prompt}}")
    card = r.model.original_card
    if card is not None and not card.is_file():
        raise InputError(f"{r.path}: [model] original_card = {str(card)!r}: file not found")


def check_source(r: Recipe) -> None:
    s = r.source
    if (s.path is None) == (s.env is None):
        raise InputError(f"{r.path}: [source] needs exactly one of `path` or `env` "
                         f"(got {'both' if s.path is not None else 'neither'})")
    if s.env is not None and not ENV_NAME.match(s.env):
        raise InputError(f"{r.path}: [source] env = {s.env!r} is not an environment variable name")


def check_convert(r: Recipe) -> None:
    c = r.convert
    if c.dtype not in DTYPES:
        raise InputError(f"{r.path}: [convert] dtype = {c.dtype!r}: must be one of "
                         f"{', '.join(DTYPES)}")
    if not SHARD_SIZE.match(c.max_shard_size):
        raise InputError(f"{r.path}: [convert] max_shard_size = {c.max_shard_size!r}: expected a "
                         "size such as \"5GB\" or \"500MB\"")


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
            (v.bits not in BITS, f"bits = {v.bits}: must be one of {', '.join(map(str, BITS))}"),
            (v.group_size != -1 and (v.group_size < 1 or v.group_size & (v.group_size - 1)),
             f"group_size = {v.group_size}: must be -1 (one group per row) or a power of two"),
            (not 0 < v.damp < 1, f"damp = {v.damp}: must be in (0, 1)"),
            (v.method not in METHODS, f"method = {v.method!r}: must be one of {', '.join(METHODS)}"),
            (v.static_groups and v.group_size == -1, "static_groups needs a group_size other than -1"),
            (v.nsamples < 1, f"nsamples = {v.nsamples}: must be at least 1"),
            (v.seqlen < 1, f"seqlen = {v.seqlen}: must be at least 1"),
            (v.seed < 0, f"seed = {v.seed}: must not be negative"),
            (not BRANCH.match(v.branch), f"branch = {v.branch!r}: use letters, digits, '.', '_', '-'"),
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
    if v.seqlen < 1:
        raise InputError(f"{r.path}: [verify] seqlen = {v.seqlen}: must be at least 1")
    if v.max_windows is not None and v.max_windows < 1:
        raise InputError(f"{r.path}: [verify] max_windows = {v.max_windows}: must be at least 1")
    for bits, tol in v.tolerance.items():
        if bits not in BITS or tol <= 0:
            raise InputError(f"{r.path}: [verify] tolerance {{ \"{bits}\" = {tol} }}: keys must be "
                             f"bit widths ({', '.join(map(str, BITS))}), values positive")
    missing = sorted({x.bits for x in r.variants} - set(v.tolerance))
    if v.tolerance and missing:
        raise InputError(f"{r.path}: [verify] tolerance has no entry for the "
                         f"{', '.join(map(str, missing))}-bit variant(s)")


def check_publish(r: Recipe) -> None:
    p = r.publish
    for key in ("fp16_repo", "gptq_repo"):
        if not REPO_ID.match(getattr(p, key)):
            raise InputError(f"{r.path}: [publish] {key} = {getattr(p, key)!r}: expected a "
                             "repository id OWNER/NAME")
    if p.fp16_repo == p.gptq_repo:
        raise InputError(f"{r.path}: [publish] fp16_repo and gptq_repo must differ "
                         "(GPTQ branches would overwrite the fp16 model)")


CHECKS = (check_model, check_source, check_convert, check_calibration, check_variants,
          check_verify, check_publish)
