"""llama.cpp itself: llama-cpp-python's bindings (with llama.cpp's log), its quantiser, and its own
command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built by `make install` from
the source llama-cpp-python vendors into <venv>/llama.cpp/bin, so the tools and the bindings are
one llama.cpp. $LLAMA_CPP_TOOLS names another folder holding them."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.core.errors import InputError, PipelineError
from pipeline.core.gguf_types import GGUFType

TOOLS_ENV = "LLAMA_CPP_TOOLS"
TAIL_CHARS = 400  # of a failed tool's output, in the error


def tool(name: str) -> Path:
    """The path of llama.cpp tool `name`; InputError saying how to build it when it is missing."""
    folder = Path(os.environ.get(TOOLS_ENV) or Path(sys.prefix) / "llama.cpp" / "bin")
    path = folder / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise InputError(f"{path}: llama.cpp's {name} is not built here (`make install` builds "
                         f"it; or set ${TOOLS_ENV} to a folder holding it)")
    return path


def run_tool(name: str, args: Sequence[str | Path], on_line: Callable[[str], None],
             what: str, cwd: Path | None = None) -> None:
    """Run tool `name` with `args` (in folder `cwd`), each output line (stdout and stderr) to
    `on_line`; a non-zero exit is a PipelineError naming `what` with the output's last lines."""
    lines: list[str] = []
    with subprocess.Popen([str(tool(name)), *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", cwd=cwd) as p:
        for line in p.stdout:
            lines.append(line)
            on_line(line)
    if p.returncode != 0:
        tail = " ".join("".join(lines[-20:]).split())[-TAIL_CHARS:]
        raise PipelineError(f"{what}: llama.cpp's {name} failed (exit {p.returncode}): {tail}")


INSTALL = "pip install -e '.[gguf]' (llama-cpp-python builds llama.cpp from source: ~6 min on 2 cores)"


def bindings() -> Any:
    """The llama_cpp module; a PipelineError saying how to install it when it is missing."""
    try:
        import llama_cpp
    except ImportError as e:
        raise PipelineError(f"llama-cpp-python is not installed, and GGUF quantisation and "
                            f"scoring run in llama.cpp: {INSTALL} ({e})") from None
    return llama_cpp


@contextmanager
def llama_log(sink: Callable[[str], None]) -> Iterator[None]:
    """llama.cpp's log text goes to `sink` while the block runs (not to the terminal), then back
    to llama-cpp-python's own handler."""
    lib = bindings()
    from llama_cpp import _logger

    @lib.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        sink(text.decode("utf-8", "replace"))

    lib.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        lib.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


QUANT_LOG_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")  # llama.cpp's quantiser: "[  3/ 39] name ..."


def quantize_file(src: Path, dst: Path, t: GGUFType, threads: int,
                  imatrix: Path | None = None) -> None:
    """llama.cpp's quantiser from the F16 file `src` to `dst`: in-process through the bindings,
    or, with an importance matrix (which the bindings cannot pass: a C++ map), its llama-quantize
    tool; the per-tensor log drives the progress bar, and its last lines explain a failure."""
    lines: list[str] = []
    with tqdm(unit="tensor", desc=f"gguf {t.name}", file=sys.stderr) as bar:
        def on_log(text: str) -> None:
            lines.append(text)
            m = QUANT_LOG_LINE.search(text)
            if m:
                bar.total = int(m.group(2))
                bar.update(int(m.group(1)) - bar.n)

        if imatrix is not None:  # by its name, from its folder: llama-quantize records the path
            run_tool("llama-quantize", ["--imatrix", imatrix.name, Path(src).resolve(),
                                        Path(dst).resolve(), t.name, threads], on_log, str(dst),
                     cwd=imatrix.parent)
            return
        lib = bindings()
        params = lib.llama_model_quantize_default_params()
        params.ftype = getattr(lib, f"LLAMA_FTYPE_{t.ftype.name}")
        params.nthread = threads
        with llama_log(on_log):
            rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        tail = " ".join("".join(lines).split())[-400:]
        raise PipelineError(f"{dst}: llama.cpp's quantiser failed for {t.name} (code {rc}): {tail}")
