"""Where a recipe may reach, and how recipe files are found and merged.

A recipe may `extends = "BASE.toml"`: its tables are merged key by key over the base's
(`[[variants]]` replaces the base's list as a whole). Relative paths are resolved against the
directory of the file that wrote them.

Confinement: a recipe alone must not make the pipeline read arbitrary files into anything it
writes or uploads. Every path a recipe file names (`extends`, [model] original_card, [source]
path, local calibration/eval sources), and every file such a directory or glob holds, must
resolve (symlinks and `..` followed) inside that file's own folder or a folder the user allows
(`allow_dirs`: `--allow-dir DIR`, or $PIPELINE_ALLOW_DIRS, a PATH-style list). `[source] env`
is the user's own choice and is not confined. The original card must also be a regular UTF-8
text file of at most MAX_CARD_BYTES; its text is read once, here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from pipeline.core.bounded import checked_path, read_bytes, read_toml, shown
from pipeline.core.calibration import glob_paths, glob_root
from pipeline.core.errors import InputError
from pipeline.core.paths import PATH

ALLOW_ENV = "PIPELINE_ALLOW_DIRS"  # folders (os.pathsep-separated) recipes may name besides their own
MAX_CARD_BYTES = 256 * 1024  # [model] original_card: a model card, not a data file
# keys holding paths, resolved against the directory of the file that wrote them
# (section, key, is_text_source: "hf:…" sources are left alone)
PATH_KEYS = (("model", "original_card", False), ("source", "path", False),
             ("calibration", "source", True), ("variants", "calibration", True),
             ("verify", "eval", True))


RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


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
