"""Atomic, safe outputs: build in a hidden temporary directory beside the target, rename at the end.

A crash, a full disk or Ctrl-C never leaves a complete-looking output: the temporary directory
(or file) is removed, or left under its unmistakable `.NAME.partial` name: after SIGKILL, and on
purpose by quantize, whose `--resume` continues from it.
Nothing is ever destroyed that is not this tool's: an output may not be, contain or lie inside
one of the stage's inputs; links are never followed or replaced; and even with --force only an
empty directory or one of this tool's outputs is replaced. An output is recognised as ours by its
manifest, the file its stage always writes (conversion.json, quant_log.json, verify.json, ...).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError, OutputExistsError, PipelineError

FAILURE_NOTES: list[str] = []  # what failed builds did with their partial outputs (the CLI says it)


def partial_path(target: Path) -> Path:
    """The temporary directory used while `target` is being built (stable, so resume finds it)."""
    target = Path(target)
    return target.parent / f".{target.name}.partial"


def lock_path(target: Path) -> Path:
    """The lock every writer of `target` holds while it builds it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold `target`'s lock (lock_path) or fail at once: two writers of one output (two
    `quantize` runs, a job's task and a standalone stage) never build it side by side. The lock
    file is removed on exit; a lock taken on a file unlinked meanwhile is taken again."""
    path = lock_path(target)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise InputError(f"{target}: cannot take its lock {path} ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{target}: another process is writing it (it holds {path}); wait "
                             "for it to finish or stop it") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def note_failure(tmp: Path, keep: bool) -> None:
    """Record what a failed build left, for the one-line message at the CLI."""
    if not (tmp.exists() or tmp.is_symlink()):
        FAILURE_NOTES.append(f"removed the partial output {tmp}")
    elif keep:
        FAILURE_NOTES.append(f"kept the partial output {tmp} for --resume")
    else:
        FAILURE_NOTES.append(f"could not remove the partial output {tmp}")


def is_ours(directory: Path, manifest: str) -> bool:
    """A real directory that is empty or holds `manifest` (written by this tool's stage)."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    try:
        return (directory / manifest).is_file() or next(directory.iterdir(), None) is None
    except OSError:  # unreadable: not provably ours
        return False


def overlap(output: Path, source: Path) -> str | None:
    """How `output` collides with the input `source` (symlinks resolved), or None."""
    try:
        o, s = Path(output).resolve(), Path(source).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise InputError(f"{output} / {source}: cannot resolve the path ({e})") from e
    if o == s:
        return "is"
    if s.is_relative_to(o):
        return "contains"
    if o.is_relative_to(s):
        return "lies inside"
    return None


def writable_location(target: Path) -> None:
    """The nearest existing ancestor of target must be a directory we may create entries in."""
    parent = target.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{target}: cannot create it: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{target}: cannot create it: {parent} is not writable "
                         "(read-only file system or permissions)")


def check_target(target: Path, force: bool, *, manifest: str | None = None,
                 magic: bytes | None = None, inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any expensive work, an output that is a link, collides with an input (as
    itself or as its partial path), cannot be written, or exists (without --force; with --force,
    unless it is an output of ours). A directory output (staged_dir) is ours when it holds
    `manifest`; a single-file output (staged_file) when it is a regular file starting with `magic`."""
    if (manifest is None) == (magic is None):
        raise TypeError("check_target: give exactly one of manifest (a directory output) or magic "
                        "(a single-file output)")
    target = Path(target)
    partial = partial_path(target)
    if target.is_symlink():
        raise InputError(f"{target}: is a symbolic link (to {os.readlink(target)}); links are "
                         "never followed or replaced: give the real output path")
    partial_kind_ok = partial.is_file() if magic is not None else partial.is_dir()
    if partial.is_symlink() or (partial.exists() and not partial_kind_ok):
        what = ("a symbolic link" if partial.is_symlink() else
                "not a regular file" if magic is not None else "not a directory")
        raise InputError(f"{partial}: the temporary name of {target} is taken by {what}, not a "
                         "partial output of this tool; remove it or choose another output")
    for source in inputs:
        for path in (target, partial):
            how = overlap(path, source)
            if how:
                raise InputError(f"{target}: the output {how} the input {source}; writing it "
                                 f"would destroy or change the input: choose an output outside it")
    if target.exists():
        if not force:
            raise OutputExistsError(f"{target} already exists; pass --force to replace it")
        if magic is not None:
            ours, mark = target.is_file() and starts_with(target, magic), f"not a {magic!r} file"
        else:
            ours, mark = is_ours(target, manifest), f"no {manifest}"
        if not ours:
            raise OutputExistsError(f"{target}: exists and is not an output of this tool ({mark}); "
                                    "not replaced even with --force: move it away or choose "
                                    "another output")
    writable_location(target)


def begin(target: Path, force: bool, inputs: Iterable[Path], **kind: Any) -> Path:
    """check_target (`kind`: its manifest or magic), then the target's folder made: the partial
    path to build in."""
    check_target(target, force, inputs=list(inputs), **kind)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{target}: cannot create the output ({e.strerror or e})") from e
    return partial_path(target)


@contextmanager
def staged_dir(target: Path, force: bool = False, keep_on_error: bool = False, *, manifest: str,
               inputs: Iterable[Path] = (),
               reuse: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it replaces `target`.
    The block must write `manifest` into it (that is how a later --force recognises it).

    keep_on_error leaves the partial directory for a later resume (quantize --resume) and
    continues one found there, unless `reuse`, asked under the output's lock, says no.
    """
    target = Path(target)
    tmp = begin(target, force, inputs, manifest=manifest)
    with exclusive(target):
        try:
            if tmp.exists() and not (reuse(tmp) if reuse is not None else keep_on_error):
                shutil.rmtree(tmp)
            tmp.mkdir(exist_ok=True)
        except OSError as e:
            raise InputError(f"{target}: cannot create the output ({e.strerror or e})") from e
        try:
            yield tmp
            replace_dir(tmp, target, force, manifest)
        except BaseException:
            if not keep_on_error:
                shutil.rmtree(tmp, ignore_errors=True)
            note_failure(tmp, keep_on_error)
            raise


def replace_dir(tmp: Path, target: Path, force: bool, manifest: str) -> None:
    """Move tmp to target; an existing target (checked again: it may have appeared meanwhile)
    is moved aside first and removed after the rename."""
    if target.exists() or target.is_symlink():
        check_target(target, force, manifest=manifest)
    try:
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(trash)  # onto the empty directory just made: a unique name
            tmp.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as e:
        raise PipelineError(f"{target}: cannot move the finished output into place "
                            f"({e.strerror or e})") from e


@contextmanager
def staged_file(target: Path, force: bool = False, *, magic: bytes,
                inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """A single-file output (a .gguf): yield a temporary path beside `target`, renamed onto it on
    success, removed on error. Refused as check_target refuses (with --force, anything but a
    regular file starting with `magic`, this tool's format, is kept)."""
    target = Path(target)
    tmp = begin(target, force, inputs, magic=magic)
    with exclusive(target):
        try:
            tmp.unlink(missing_ok=True)
        except OSError as e:
            raise InputError(f"{target}: cannot create the output ({e.strerror or e})") from e
        try:
            yield tmp
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            note_failure(tmp, False)
            raise


def starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic
