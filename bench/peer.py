"""GPTQModel as the peer quantiser the benches time and score ours against: its own quantize() with
its defaults at the given grid (its MSE range search with our norm, 2.4, when asked), on our
calibration windows, in a child process (it keeps global
thread pools) with the parent's thread count.

    python bench/peer.py MODEL OUT BITS GROUP ACT_ORDER MSE CALIBRATION NSAMPLES SEQLEN THREADS
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gptqmodel(model: Path, out: Path, bits: int, group: int, act_order: bool, calibration: str,
              nsamples: int, seqlen: int, threads: int, mse: bool = False) -> float:
    """Seconds GPTQModel took to load and quantise `model` into `out` (saving excluded)."""
    # GPTQModel sizes its CPU worker pool as half the cores, and its model-loader pool asks for 2:
    # on a 2-core machine that pool cannot be built unless the CPU pool has 2 workers
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(max(2, threads)),
           "OMP_NUM_THREADS": str(threads)}
    args = [model, out, bits, group, int(act_order), int(mse), calibration, nsamples, seqlen, threads]
    r = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True,
                       env=env)
    if r.returncode:
        sys.exit(f"GPTQModel failed:\n{r.stderr[-3000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def main(model: str, out: str, bits: str, group: str, act: str, mse: str, calibration: str,
         nsamples: str, seqlen: str, threads: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    from pipeline.core.calibration import load_calibration
    from pipeline.core.grid import Quantizer
    from pipeline.core.tokenizer import load_tokenizer

    torch.set_num_threads(int(threads))
    tokens, _ = load_calibration(calibration, load_tokenizer(Path(model)), int(nsamples),
                                 int(seqlen), 0)
    t0 = time.perf_counter()
    m = GPTQModel.load(model, QuantizeConfig(bits=int(bits), group_size=int(group),
                                             desc_act=act == "1", sym=True, damp_percent=0.01,
                                             mse=Quantizer(int(bits)).norm if mse == "1" else 0.0),
                       device="cpu")
    m.quantize([{"input_ids": t[None], "attention_mask": torch.ones_like(t[None])} for t in tokens],
               batch_size=1)
    seconds = time.perf_counter() - t0
    m.save(out)
    print(seconds)


if __name__ == "__main__":
    main(*sys.argv[1:])
