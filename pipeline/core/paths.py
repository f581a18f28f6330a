"""Paths from the command line, checked as click parses them (pipeline/core/bounded.py path_problem: NUL
bytes, undecodable bytes, names over the system's limits, symbolic-link loops), so a bad path is
one line naming it and exit 2 before any stage starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipeline.core.bounded import checked_path


class CheckedPath(click.ParamType):
    """A click path argument or option: a Path, or an InputError naming the parameter."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            value = str(value)
        what = f"{param.human_readable_name}" if param is not None else "path"
        return checked_path(value, what)


PATH = CheckedPath()
