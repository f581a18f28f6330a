"""Exceptions the stages raise; the CLI turns them into messages and exit codes, once."""

from __future__ import annotations

import errno
import os


class PipelineError(Exception):
    """A failure the user can act on; the message says what and where."""

    exit_code = 1


class InputError(PipelineError):
    """Bad or missing input: the message names the file (or tensor) and what is wrong."""

    exit_code = 2


class OutputExistsError(PipelineError):
    """The output path exists and --force was not given."""

    exit_code = 2


class CheckFailed(PipelineError):
    """A verification check failed; the artifact must not be published."""

    exit_code = 3


class SystemFailure(PipelineError):
    """The operating system refused (a full disk, a read-only file system, permissions, a path
    too long or looping): the message names the path and the reason, never a traceback."""


# errno -> (what it means here, exit code): 1 for the machine's state (retry when it is fixed), 2
# for a path the user gave that cannot work as given.
OS_REASONS = {
    errno.ENOSPC: ("no space left on the device", 1),
    errno.EDQUOT: ("disk quota exceeded", 1),
    errno.EFBIG: ("file too large (a file size limit)", 1),
    errno.EIO: ("input/output error on the device", 1),
    errno.ENOMEM: ("out of memory", 1),
    errno.EMFILE: ("too many open files", 1),
    errno.EROFS: ("read-only file system", 2),
    errno.EACCES: ("permission denied", 2),
    errno.EPERM: ("operation not permitted", 2),
    errno.ENAMETOOLONG: ("file name too long", 2),
    errno.ELOOP: ("a loop of symbolic links", 2),
    errno.ENOENT: ("no such file or directory", 2),
    errno.ENOTDIR: ("a file where a directory belongs", 2),
    errno.EISDIR: ("a directory where a file belongs", 2),
    errno.EEXIST: ("already exists", 2),
    errno.ENOTEMPTY: ("directory not empty", 2),
    errno.EXDEV: ("crosses file systems", 2),
}


def os_failure(e: OSError, path: os.PathLike | str | None = None) -> SystemFailure:
    """An OSError as a one-line SystemFailure: the path(s) (`path` when the error names none),
    the reason and errno's name. A short write that set no errno (numpy's tofile) on a device
    left without free space is the full disk it is."""
    code = e.errno
    if code is None and path is not None and free_bytes(path) < FULL_BELOW:
        code = errno.ENOSPC
    reason, exit_code = OS_REASONS.get(code, (e.strerror or str(e) or type(e).__name__, 1))
    name = errno.errorcode.get(code, "") if code else ""
    named = [p for p in (e.filename, e.filename2) if p is not None]
    paths = [os.fsdecode(p) for p in (named or ([path] if path is not None else []))]
    where = " -> ".join(p.encode("utf-8", "backslashreplace").decode() for p in paths)
    failure = SystemFailure(f"{where + ': ' if where else ''}{reason}" + (f" ({name})" if name else ""))
    failure.exit_code = exit_code
    return failure


FULL_BELOW = 1 << 20  # free bytes under which a device counts as full


def free_bytes(path: os.PathLike | str) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        st = os.statvfs(p)
    except OSError:
        return FULL_BELOW
    return st.f_bavail * st.f_frsize


def first_line(e: BaseException) -> str:
    """Another library's error message on one line, short, for a message that quotes it."""
    return " ".join(str(e).split())[:300] or type(e).__name__
