"""`python -m pipeline STAGE …`: each stage module defines a click `command`, loaded lazily."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import traceback
from pathlib import Path

import click

from pipeline import __version__
from pipeline.core.errors import InputError, PipelineError, SystemFailure, first_line, os_failure
from pipeline.core.output import FAILURE_NOTES
from pipeline.credentials import RedactingStream, redact, secret_labels

# command name -> module defining `command`; imported only when invoked (torch is slow to import).
COMMANDS = {
    "convert": "pipeline.convert",
    "quantize": "pipeline.quantize",
    "gguf": "pipeline.gguf",
    "imatrix": "pipeline.imatrix",
    "verify": "verify.stage",
    "publish": "pipeline.publish",
    "run": "pipeline.run",
    "demo": "pipeline.demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name]).command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pipeline")
def cli() -> None:
    """Meta Llama-family checkpoints to verified fp16, GPTQ and GGUF Hugging Face repositories."""


def main() -> None:
    """Run the CLI. Every failure ends as one line and an exit code, never a traceback: a
    PipelineError as its message; an OSError by its errno (the path, the reason, what was left);
    anything else as `internal error`, its traceback in a crash report. No secret in use (the
    Hub token, a secret-named environment variable's value) reaches stdout or stderr."""
    labels = secret_labels()
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(out, labels), RedactingStream(err, labels)
    FAILURE_NOTES.clear()
    try:
        sys.exit(invoke())
    finally:
        sys.stdout, sys.stderr = out, err


def invoke() -> int:
    """The command's exit code, its failure (if any) said in one line on stderr."""
    try:
        cli(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except PipelineError as e:
        return fail(e)
    except OSError as e:
        return fail(os_failure(e))
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in ("pipeline", "verify"):
            return internal_error(e)
        return fail(InputError(f"the package {e.name!r}, which this command needs, is not "
                               "installed; install the project with its extras: make install"))
    except MemoryError:
        return fail(PipelineError("out of memory"))
    except Exception as e:  # a bug: one line here, the traceback in a file
        return internal_error(e)
    return 0


def internal_error(e: BaseException) -> int:
    """A bug: one line naming the exception and the crash report holding its traceback."""
    try:
        where = f"the traceback is in {crash_report(e)}"
    except OSError as why:
        where = f"no crash report could be written: {why.strerror or why}"
    click.echo(f"internal error: {type(e).__name__}: {first_line(e)} (a bug; {where})", err=True)
    return 1


def fail(e: PipelineError) -> int:
    """Say e in one line, with what a failed build left behind; its exit code."""
    left = "; ".join(FAILURE_NOTES)
    kept = f"; {left}; inputs are untouched" if left and isinstance(e, SystemFailure) else ""
    click.echo(f"error: {one_line(str(e))}{kept}", err=True)
    return e.exit_code


def one_line(text: str) -> str:
    """`text` on one line: a newline or other control character a value carried is escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def crash_report(e: BaseException) -> Path:
    """The traceback, secrets removed, in a file under the system's temporary folder."""
    text = "".join(traceback.format_exception(e))
    text = redact(f"pipeline {__version__}: {' '.join(map(repr, sys.argv))}\n{text}", secret_labels())
    fd, name = tempfile.mkstemp(prefix="pipeline-crash-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)
    return Path(name)
