"""`python -m pipeline STAGE …`: each stage module defines a click `command`, loaded lazily."""

from __future__ import annotations

import importlib
import sys

import click

from pipeline import __version__
from verify.errors import PipelineError

# command name -> module defining `command`; imported only when invoked (torch is slow to import).
COMMANDS = {
    "convert": "pipeline.convert",
    "quantize": "pipeline.quantize",
    "gguf": "pipeline.gguf",
    "verify": "pipeline.judge",
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
    """Run the CLI; PipelineError becomes a one-line message and its exit code."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except PipelineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
