"""The CLI: every stage is listed and documented; errors become one line and a non-zero exit."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli import COMMANDS, cli


def test_every_command_has_help():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for name in COMMANDS:
        assert name in top.output
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "--json" in result.output, name  # every command: one JSON object on stdout


@pytest.mark.parametrize("args", [["convert", "/nonexistent/model", "/tmp/never-written"]])
def test_bad_input_is_one_line_and_exit_2(args):
    p = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ")
    assert "/nonexistent/model" in p.stderr
    assert "Traceback" not in p.stderr
