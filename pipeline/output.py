"""Atomic outputs: build in a hidden temporary directory beside the target, rename at the end.

A crash, a full disk or Ctrl-C never leaves a complete-looking output: the temporary directory
is removed, or (after SIGKILL) left under an unmistakable `.NAME.partial-PID` name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import OutputExistsError


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing output unless --force; call before any expensive work."""
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists; pass --force to replace it")


@contextmanager
def staged_dir(target: Path, force: bool = False, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it replaces `target`.

    keep_on_error leaves the partial directory for a later resume (quantize --resume).
    """
    target = Path(target)
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(target)
    if tmp.exists() and not keep_on_error:
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def partial_path(target: Path) -> Path:
    """The temporary directory used while `target` is being built (stable, so resume finds it)."""
    return target.parent / f".{target.name}.partial"


def replace_dir(tmp: Path, target: Path) -> None:
    """Move tmp to target; an existing target (only reached with --force) is removed first."""
    if target.exists():
        trash = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(trash)
        tmp.rename(target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(target)
