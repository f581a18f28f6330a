"""A Hugging Face Llama checkpoint directory read lazily: safetensors are memory-mapped and
tensors are materialised one at a time, so any model size fits."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pipeline.errors import InputError
from verify.llama import LlamaArgs

INDEX_NAME = "model.safetensors.index.json"


class HFCheckpoint:
    """config.json + safetensors (single file or index); `tensor(name)` reads one tensor."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise InputError(f"{cfg_file}: missing (not a Hugging Face model directory)")
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{cfg_file}: invalid JSON ({e})") from e
        arch = self.config.get("architectures") or []
        if self.config.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
            raise InputError(f"{cfg_file}: model_type {self.config.get('model_type')!r} is not "
                             "a Llama-family model")
        self.weight_map = self._weight_map()
        self._handles: dict[str, Any] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise InputError(f"{index}: not a safetensors index ({e})") from e
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise InputError(f"{self.path}: no model.safetensors or {INDEX_NAME}")
        with safe_open(single, framework="pt") as f:
            return {k: single.name for k in f.keys()}

    @cached_property
    def args(self) -> LlamaArgs:
        try:
            return LlamaArgs.from_hf_config(self.config)
        except KeyError as e:
            raise InputError(f"{self.path / 'config.json'}: missing key {e}") from e

    @property
    def quantization(self) -> dict[str, Any] | None:
        """config.json's quantization_config (None for an unquantised checkpoint)."""
        return self.config.get("quantization_config")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, as stored (dtype unchanged), on the CPU."""
        if name not in self.weight_map:
            raise InputError(f"{self.path}: tensor {name} not found")
        file = self.weight_map[name]
        if file not in self._handles:
            p = self.path / file
            if not p.is_file():
                raise InputError(f"{p}: missing (listed in {INDEX_NAME})")
            self._handles[file] = safe_open(p, framework="pt")
        return self._handles[file].get_tensor(name)

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """All tensors of decoder layer i, keyed without the `model.layers.{i}.` prefix. The memory
        maps are dropped afterwards, so the pages they touched do not pile up layer after layer."""
        prefix = f"model.layers.{i}."
        state = {n[len(prefix):]: self.tensor(n) for n in self.weight_map if n.startswith(prefix)}
        self._handles.clear()
        return state

    def lm_head(self) -> torch.Tensor:
        """The output projection (the embedding when tied)."""
        if "lm_head.weight" in self.weight_map:
            return self.tensor("lm_head.weight")
        return self.tensor("model.embed_tokens.weight")
