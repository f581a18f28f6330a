"""A tiny project for the hostile-input tests (test_input_classes, test_fuzz_inputs): a Llama 2-shaped
random Meta checkpoint, its fp16 conversion, calibration and evaluation text, a recipe naming
them, and the recipe's job run up to verify in `job/`, so every kind of file the tool reads exists
to be damaged."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from meta_fixtures import build_checkpoint

from pipeline.convert import convert

RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu"]
RECIPE = """
[model]
name = "{name}"

[source]
{source}

[calibration]
source = "{calibration}"
nsamples = 4
seqlen = 32

[[variants]]
branch = "main"
bits = 4
group_size = 32

[verify]
eval = "{eval}"
seqlen = 32
max_windows = 2
# random weights: the job's plumbing is under test, not quantisation quality
tolerance = {{ "4" = 10.0 }}
kl_mean = {{ "4" = 10.0 }}
kl_p99 = {{ "4" = 10.0 }}
top1 = {{ "4" = 0.0 }}
agreement = {{ "4" = 0.0 }}
prompts = ["def f(x):"]

[publish]
fp16_repo = "{fp16_repo}"
gptq_repo = "org/Tiny-GPTQ"
"""


def recipe_text(name: str = "Tiny", source: str = 'path = "meta"',
                fp16_repo: str = "org/Tiny-fp16", calibration: str = "cal.py",
                eval_text: str = "eval.py") -> str:
    return RECIPE.format(name=name, source=source, fp16_repo=fp16_repo, calibration=calibration,
                         eval=eval_text)


def build_project(d: Path) -> Path:
    """meta/, fp16/, cal.py, eval.py, tiny.toml and job/ (run up to verify) in `d`."""
    build_checkpoint(d / "meta", "llama2", n_shards=2)
    convert(d / "meta", d / "fp16")
    (d / "cal.py").write_text(inspect.getsource(json.decoder))
    (d / "eval.py").write_text(inspect.getsource(textwrap))
    (d / "tiny.toml").write_text(recipe_text())
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(d / "tiny.toml"),
                          "--workdir", str(d / "job"), "--stage", "verify", "--device", "cpu"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return d
