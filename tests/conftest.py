"""Shared test settings: deterministic seeds, quiet tokenizers; nothing here touches a network."""

import os

import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.manual_seed(0)
