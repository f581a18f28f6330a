"""`python -m pipeline ARGS` run inside the test's process, so tests assert on the exit code and
the messages exactly as a user sees them."""

from __future__ import annotations

import sys

from pipeline.cli import main


def run_cli(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); an exception main() does not turn into an exit code escapes,
    so a traceback fails the test."""
    monkeypatch.setattr(sys, "argv", ["pipeline", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err
