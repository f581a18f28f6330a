"""llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built by
`make install` from the source llama-cpp-python vendors into <venv>/llama.cpp/bin, so the tools
and the bindings are one llama.cpp. $LLAMA_CPP_TOOLS names another folder holding them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.core.errors import InputError, PipelineError

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
