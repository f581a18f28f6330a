"""The shipped demo checkpoint (recipes/demo/) as a test fixture: a trained CodeLlama-shaped model
in Meta's format with its calibration and held-out text. The same bytes on every machine, so a
threshold measured on it holds everywhere (unlike a model trained at test time)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo"
META = DEMO / "meta"                       # params.json, consolidated.0{0,1}.pth, tokenizer.model
CALIBRATION = str(DEMO / "text" / "calib" / "*.py.txt")
EVAL = str(DEMO / "text" / "eval" / "*.py.txt")
RAGGED_FFN = 704  # 5.5 groups of 128: down_proj gets a partial last group
# The demo recipe trimmed for the scale-out tests: 2 variants and one GGUF type at a tenth of the
# demo's calibration, no runtimes (~10 s locally)
TRIMMED_RECIPE = f"""
extends = "{DEMO.parent / 'demo.toml'}"

[calibration]
nsamples = 32

[[variants]]
branch = "main"
bits = 4
group_size = 128
damp = 0.1

[[variants]]
bits = 8
group_size = 128
act_order = true
damp = 0.1

[[gguf]]
type = "Q8_0"

[verify]
max_windows = 4
baseline_rtn = false
runtimes = []
prompts = ["def fibonacci(n):"]
chat_prompts = []
"""
_BUILT: list[Path] = []  # process-wide cache: the first conversion, copied for later callers


def demo_fp16(directory: Path) -> Path:
    """The demo checkpoint converted to an HF fp16 directory at `directory` (converted once per
    process, copied afterwards, so callers may modify their copy); returns `directory`."""
    directory = Path(directory)
    if not _BUILT:
        from pipeline.convert import convert
        from pipeline.recipe import load_recipe

        recipe = load_recipe(DEMO.parent / "demo.toml")
        built = Path(tempfile.mkdtemp(prefix="demo-fp16-")) / "fp16"
        convert(META, built, chat_format=recipe.model.chat_format)  # as the demo job does
        _BUILT.append(built)
    shutil.copytree(_BUILT[0], directory, dirs_exist_ok=True)
    return directory


def ragged_model(fp16: Path, out: Path, ffn: int) -> Path:
    """The demo model with its FFN cut to the first `ffn` neurons (gate/up rows, down columns)."""
    shutil.copytree(fp16, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "intermediate_size": ffn}))
    files = sorted(out.glob("*.safetensors"))
    for f in files:
        state = load_file(f)
        for k, v in state.items():
            if k.endswith(("gate_proj.weight", "up_proj.weight")):
                state[k] = v[:ffn].contiguous()
            elif k.endswith("down_proj.weight"):
                state[k] = v[:, :ffn].contiguous()
        save_file(state, str(f), metadata={"format": "pt"})
    return out
