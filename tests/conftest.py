"""Shared test settings: deterministic seeds, quiet tokenizers, one torch thread; nothing here
touches a network."""

import os

import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.manual_seed(0)
# Every model in the suite is tiny: on 2 cores, intra-op threads mostly wait for each other (GPTQ's
# per-column steps, fp16 matmuls in the runtimes), several times slower than one thread.
torch.set_num_threads(1)
# ... and the jobs' tasks the same (pipeline/job.py default_cpus), so their bytes match the
# quantize and verify calls made directly; tests of the real default delete it.
os.environ.setdefault("PIPELINE_TASK_CPUS", "1")


def pytest_configure(config) -> None:
    """The tiers: `make test` runs everything, `make test-fast` (-m "not slow") the inner loop."""
    config.addinivalue_line("markers", "slow: runs a stage, a job, a runtime or a real model end "
                                       "to end (left out by make test-fast)")
