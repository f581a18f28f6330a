"""GPTQ variants run in the runtimes users load them with, each through its own loader and kernels,
scored on the same evaluation windows as our dequantised forward: loaded or not (with the error),
perplexity, and KL / top-1 against fp16. A new runtime is one adapter and one row of RUNTIMES.
Whether the perplexities match is verify/thresholds.py's PPL_MATCH (measured there).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from verify.thresholds import runtime_matched

if TYPE_CHECKING:  # imported where used: a recipe names runtimes without loading torch
    import torch

DTYPE = "float16"  # GPTQ kernels compute in fp16 (GPTQModel's torch kernel: fp16/bf16 only)
ERROR_CHARS = 500  # an error message is cut to this many characters in the result

# fp16's logits [T - 1, V] (on the CPU) at the scored positions of window b: the reference for KL
# and top-1, e.g. lambda b: fp16.project(h_fp16[b, :-1].to(fp16.device)).cpu()
Reference = Callable[[int], "torch.Tensor"]


@dataclass
class Scored:
    """One window scored by a runtime: the log-probability of each next token [T - 1], the token
    the runtime ranks first [T - 1], and its logits [T - 1, V] where it exposes them."""

    token_logprobs: torch.Tensor  # float64
    top: torch.Tensor  # int64
    logits: torch.Tensor | None  # float32; None when only top-k log-probs come out (vLLM)


class Loaded(Protocol):
    """A GPTQ directory loaded in a runtime."""

    kernels: list[str]  # what runs the quantised linears, as the runtime names it

    def score(self, window: torch.Tensor) -> Scored: ...  # token ids [T]


@dataclass(frozen=True)
class Runtime:
    """How to load a GPTQ directory in one runtime, what it needs to be checked at all, and what
    cards say of it."""

    label: str  # its name on model cards
    packages: tuple[str, ...]  # distributions that must be installed (first: the reported version)
    needs_cuda: bool
    load: Callable[[Path, torch.device], Loaded]
    refuses_ragged: bool = False  # its kernels refuse a partial last group (RAGGED_REFUSED_BY)


class TransformersModel:
    """A transformers causal LM (what GPTQModel and transformers both load into), scored one
    window at a time: logits in the model's dtype, log-probs in float32."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model.eval(), device
        self.kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})

    def score(self, window: torch.Tensor) -> Scored:
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=window[None].to(self.device)).logits[0, :-1].float().cpu()
        lp = torch.log_softmax(logits, -1).gather(-1, window[1:, None].cpu()).squeeze(-1)
        return Scored(lp.double(), logits.argmax(-1), logits)


def load_gptqmodel(path: Path, device: torch.device) -> Loaded:
    """GPTQModel's own loader: its torch kernel on the CPU, its kernel choice on CUDA."""
    # its "model_loader:cpu" pool asks for 2 CPU workers; the default is (cores + 1) // 2
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    import torch
    from gptqmodel import BACKEND, GPTQModel

    backend = BACKEND.GPTQ_TORCH if device.type == "cpu" else BACKEND.AUTO
    wrapper = GPTQModel.load(str(path), device=str(device), backend=backend,
                             dtype=getattr(torch, DTYPE))
    return TransformersModel(wrapper.model, device)


def load_transformers(path: Path, device: torch.device) -> Loaded:
    """`AutoModelForCausalLM.from_pretrained(directory)` as a user calls it: transformers hands
    GPTQ to optimum, which takes GPTQModel's default kernel for the device."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, DTYPE),
                                                 device_map={"": device})
    return TransformersModel(model, device)


class VLLMModel:
    """vLLM's engine (Marlin where it applies): it returns top-k log-probs of the prompt, not
    logits, so KL is not measured; the actual token's log-prob and the top-1 token are."""

    def __init__(self, path: Path, device: torch.device) -> None:
        from vllm import LLM, SamplingParams

        del device  # vLLM places itself on the visible GPU (CUDA_VISIBLE_DEVICES)
        self.llm = LLM(model=str(path), dtype="float16", enforce_eager=True, seed=0,
                       gpu_memory_utilization=0.5)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=1)
        self.kernels = [str(getattr(self.llm.llm_engine.model_config, "quantization", None))]

    def score(self, window: torch.Tensor) -> Scored:
        import torch

        ids = window.tolist()
        (out,) = self.llm.generate([{"prompt_token_ids": ids}], self.params, use_tqdm=False)
        steps = out.prompt_logprobs[1:]  # the first position has no prediction
        lp = [step[t].logprob for step, t in zip(steps, ids[1:], strict=True)]
        top = [next(k for k, v in step.items() if v.rank == 1) for step in steps]
        return Scored(torch.tensor(lp, dtype=torch.float64), torch.tensor(top), None)


# transformers (optimum) picks GPTQModel's int4/AVX-512 CPU kernels, which refuse a partial last
# group (measured); GPTQModel's own torch kernel accepts it, as the format does
RUNTIMES: dict[str, Runtime] = {
    "gptqmodel": Runtime("GPTQModel", ("gptqmodel",), False, load_gptqmodel),
    "transformers": Runtime("Transformers", ("transformers", "optimum", "gptqmodel"), False,
                            load_transformers, refuses_ragged=True),
    "vllm": Runtime("vLLM", ("vllm",), True, VLLMModel, refuses_ragged=True),
}
# Runtimes and kernels that refuse a linear whose input width is not a multiple of the group size
# (pipeline/core/gptq_format.py ragged): those of RUNTIMES that do, then kernels that are no runtime here.
RAGGED_REFUSED_BY = (*(rt.label for rt in RUNTIMES.values() if rt.refuses_ragged),
                     "Marlin", "ExLlama")
RUNTIME_WINDOWS = 4  # evaluation windows each runtime check scores (the first ones): a bounded cost


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + "…"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def not_checked(name: str, device: torch.device) -> str | None:
    """Why runtime `name` cannot be checked here (None when it can)."""
    rt = RUNTIMES[name]
    if rt.needs_cuda and device.type != "cuda":
        return "not checked: needs CUDA"
    missing = [p for p in rt.packages if importlib.util.find_spec(p) is None]
    if missing:
        return f"not checked: {', '.join(missing)} not installed (pip install '.[runtimes]')"
    return None


def eager(device: torch.device) -> contextlib.AbstractContextManager:
    """torch.compile off on the CPU. GPTQModel compiles its torch kernel's dequantiser per module
    there (inductor: a minute for the demo model on 2 cores, far more for a 7B); eagerly it runs
    the same kernel code and gave the same perplexity to the last digit (4-bit and 3-bit)."""
    import torch

    if device.type == "cpu":
        return torch._dynamo.config.patch(disable=True)
    return contextlib.nullcontext()


def run_runtime(name: str, variant: Path, windows: torch.Tensor, *, ppl_ours: float | None = None,
                reference: Reference | None = None, device: str = "auto") -> dict[str, Any]:
    """Load the GPTQ directory `variant` in runtime `name` and score the token windows [N, T]
    (perplexity as verify/metrics.py: summed NLL per window). With ppl_ours (our dequantised
    perplexity on the same windows) the result says whether it matches (thresholds.PPL_MATCH); with
    `reference` (fp16 logits per window) it has KL and top-1 against fp16. A runtime that cannot
    run here is reported "not checked" with the reason, never passed. Its output goes to stderr."""
    import torch

    from pipeline.core.llama import pick_device
    from verify.metrics import kl_summary, kl_top1, perplexity

    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r} (known: {', '.join(RUNTIMES)})")
    dev = pick_device(device)
    rt = RUNTIMES[name]
    result: dict[str, Any] = {
        "runtime": name, "variant": Path(variant).name, "version": _version(rt.packages[0]),
        "device": str(dev), "dtype": DTYPE, "checked": False,
        "reason": not_checked(name, dev), "loaded": False, "error": None, "kernels": [],
        "ppl": None, "ppl_ours": ppl_ours, "ratio": None, "kl_mean": None, "kl_p99": None,
        "top1": None, "passed": None, "seconds": 0.0}
    if result["reason"]:
        return result
    result["checked"] = True
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr), eager(dev):  # GPTQModel logs to stdout
        try:
            model = rt.load(Path(variant), dev)
            result.update(loaded=True, kernels=model.kernels)
            scored = [model.score(w) for w in windows]
        except Exception as e:  # a runtime refusing the variant is a result, not a crash
            result["error"] = ("scoring: " if result["loaded"] else "loading: ") + _error(e)
            scored = None
        finally:
            model = None
            gc.collect()
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if scored is None:
        result["passed"] = False
        return result
    nll = torch.stack([-s.token_logprobs.sum() for s in scored])
    result["ppl"] = perplexity(nll, windows.shape[1])
    if ppl_ours is not None:
        result["ratio"] = result["ppl"] / ppl_ours - 1
        result["passed"] = runtime_matched(result["ratio"])
    if reference is not None:
        refs = [reference(b) for b in range(len(scored))]
        same = torch.cat([r.argmax(-1) == s.top for r, s in zip(refs, scored, strict=True)])
        result["top1"] = float(same.double().mean())
        if all(s.logits is not None for s in scored):
            kl = torch.cat([kl_top1(r, s.logits)[0] for r, s in zip(refs, scored, strict=True)])
            summary = kl_summary(kl, same)
            result.update(kl_mean=summary["kl_mean"], kl_p99=summary["kl_p99"])
    return result
