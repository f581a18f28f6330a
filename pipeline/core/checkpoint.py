"""A Hugging Face Llama checkpoint directory read lazily: safetensors are memory-mapped and
tensors are materialised one at a time, so any model size fits.

Opening one checks everything short of the tensor data (headers only, so it is cheap at any size):
config.json's hyper-parameters, every safetensors header against its file, and every tensor the
config implies present, with a float dtype (or GPTQ's packed ones) and the implied shape. So a
corrupt or inconsistent checkpoint is an InputError naming the file and tensor, never a crash.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from pipeline.core.bounded import read_json
from pipeline.core.errors import InputError
from pipeline.core.gptq_format import packed_shapes
from pipeline.core.gptq_layout import BITS, GROUP_SIZE_RULE, n_groups, valid_group_size
from pipeline.core.llama import LAYER_NORMS, LlamaArgs
from pipeline.core.safetensors_stream import (DTYPES, FLOAT_DTYPES, INDEX_NAME, StoredTensor,
                                              read_header)

SINGLE_NAME = "model.safetensors"
IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; not weights


class HFCheckpoint:
    """config.json + safetensors (single file or index); `tensor(name)` reads one tensor."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise InputError(f"{cfg_file}: missing (not a Hugging Face model directory)")
        self.config = read_json(cfg_file)
        arch = self.config.get("architectures", ["LlamaForCausalLM"])
        if self.config.get("model_type") != "llama" or not (
                isinstance(arch, list) and "LlamaForCausalLM" in arch):
            raise InputError(f"{cfg_file}: model_type {self.config.get('model_type')!r}, "
                             f"architectures {arch!r}: not a Llama model (transformers loads it "
                             "by model_type \"llama\", class LlamaForCausalLM)")
        self.headers: dict[str, dict[str, StoredTensor]] = {}
        self.weight_map = self._weight_map()
        self._handles: dict[str, Any] = {}
        self.check_tensors()
        self.check_loadable()

    def check_loadable(self) -> None:
        """transformers must accept config.json as well: it checks fields this reader does not
        use (token ids, initializer_range, ...), and users load the model through it."""
        from transformers import LlamaConfig

        try:
            LlamaConfig.from_dict(dict(self.config))
        except Exception as e:  # transformers raises many types (strict-dataclass, Key, Value)
            reason = " ".join(str(e).split())[:300]
            raise InputError(f"{self.path / 'config.json'}: transformers refuses it "
                             f"({type(e).__name__}: {reason})") from e

    def _weight_map(self) -> dict[str, str]:
        """tensor name -> file, from the index (or the single file), every header checked."""
        index = self.path / INDEX_NAME
        if not index.is_file():
            if not (self.path / SINGLE_NAME).is_file():
                raise InputError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}")
            self.headers[SINGLE_NAME] = read_header(self.path / SINGLE_NAME)
            return {k: SINGLE_NAME for k in self.headers[SINGLE_NAME]}
        data = read_json(index)
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise InputError(f"{index}: not a safetensors index (no weight_map of names to files)")
        for file in sorted(set(wm.values())):
            if Path(file).name != file or file in (".", "..") or not file.endswith(".safetensors"):
                raise InputError(f"{index}: file {file!r} is not a .safetensors file name in "
                                 f"{self.path}")
            if not (self.path / file).is_file():
                raise InputError(f"{self.path / file}: missing (listed in {INDEX_NAME})")
            self.headers[file] = read_header(self.path / file)
            held = self.headers[file]
            listed = {n for n, f in wm.items() if f == file}
            for name in sorted(listed - set(held))[:1]:
                raise InputError(f"{self.path / file}: does not hold tensor {name} "
                                 f"({INDEX_NAME} says it does)")
            for name in sorted(set(held) - listed)[:1]:
                raise InputError(f"{self.path / file}: holds tensor {name}, which {INDEX_NAME} "
                                 f"assigns to {wm.get(name, 'no file')}")
        return dict(wm)

    @cached_property
    def args(self) -> LlamaArgs:
        try:
            return LlamaArgs.from_hf_config(self.config)
        except ValueError as e:
            raise InputError(f"{self.path / 'config.json'}: {e}") from e

    @property
    def quantization(self) -> dict[str, Any] | None:
        """config.json's quantization_config (None for an unquantised checkpoint)."""
        return self.config.get("quantization_config")

    @cached_property
    def grid(self) -> tuple[int, int] | None:
        """(bits, group_size) of a GPTQ checkpoint, checked; None when unquantised."""
        q = self.quantization
        if q is None:
            return None
        where = f"{self.path / 'config.json'}: quantization_config"
        if not isinstance(q, dict):
            raise InputError(f"{where} must be an object")
        method, fmt = q.get("quant_method"), q.get("checkpoint_format", "gptq")
        if method != "gptq" or fmt != "gptq":
            raise InputError(f"{where} quant_method {method!r} checkpoint_format {fmt!r}; only "
                             "GPTQ v1 ('gptq') is supported")
        bits, group = q.get("bits"), q.get("group_size", -1)
        if type(bits) is not int or bits not in BITS:
            raise InputError(f"{where}.bits = {bits!r}: must be one of {BITS}")
        if type(group) is not int or not valid_group_size(group):
            raise InputError(f"{where}.group_size = {group!r}: {GROUP_SIZE_RULE}")
        for key in ("desc_act", "sym"):
            if not isinstance(q.get(key, False), bool):
                raise InputError(f"{where}.{key} = {q[key]!r}: must be true or false")
        return bits, group

    def expected(self) -> Iterator[tuple[str, frozenset[str], tuple[int, ...]]]:
        """(name, allowed dtypes, shape) of every tensor config.json implies, in file order."""
        a = self.args
        yield "model.embed_tokens.weight", FLOAT_DTYPES, (a.vocab_size, a.dim)
        for i in range(a.n_layers):
            p = f"model.layers.{i}."
            for norm in LAYER_NORMS:
                yield p + norm, FLOAT_DTYPES, (a.dim,)
            for name, (n_out, n_in) in a.linear_shapes().items():
                if self.grid is None:
                    yield f"{p}{name}.weight", FLOAT_DTYPES, (n_out, n_in)
                    continue
                bits, group = self.grid
                for suffix, (dtype, shape) in packed_shapes(n_out, n_in, bits,
                                                            n_groups(n_in, group)).items():
                    allowed = FLOAT_DTYPES if dtype.is_floating_point else frozenset({DTYPES[dtype]})
                    yield f"{p}{name}.{suffix}", allowed, shape
        yield "model.norm.weight", FLOAT_DTYPES, (a.dim,)
        if not a.tie_word_embeddings or "lm_head.weight" in self.weight_map:
            yield "lm_head.weight", FLOAT_DTYPES, (a.vocab_size, a.dim)

    def check_tensors(self) -> None:
        """Every implied tensor present with an allowed dtype and its shape; no other tensors.
        Stops at the first missing one, so an absurd num_hidden_layers costs nothing."""
        cfg = self.path / "config.json"
        seen = set()
        for name, dtypes, shape in self.expected():
            if name not in self.weight_map:
                layer = name.split(".")[2] if name.startswith("model.layers.") else None
                raise InputError(f"{self.path}: {f'layer {layer} lacks ' if layer else ''}tensor "
                                 f"{name}{'' if layer else ' missing'} ({cfg} describes "
                                 f"{self.args.n_layers} layers"
                                 f"{', GPTQ-packed' if self.grid else ''})")
            file = self.weight_map[name]
            t = self.headers[file][name]
            if t.dtype not in dtypes:
                raise InputError(f"{self.path / file}: tensor {name} has dtype {t.dtype}; "
                                 f"expected {' or '.join(sorted(dtypes))}")
            if t.shape != shape:
                raise InputError(f"{self.path / file}: tensor {name} has shape {list(t.shape)}; "
                                 f"{cfg} implies {list(shape)}")
            seen.add(name)
        unknown = sorted(n for n in self.weight_map if n not in seen and not n.endswith(IGNORED))
        if unknown:
            raise InputError(f"{self.path / self.weight_map[unknown[0]]}: unexpected tensor(s) "
                             f"{unknown[:3]} for the {self.args.n_layers}-layer Llama {cfg} "
                             "describes")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, as stored (dtype unchanged), on the CPU."""
        if name not in self.weight_map:
            raise InputError(f"{self.path}: tensor {name} not found")
        file = self.weight_map[name]
        try:
            if file not in self._handles:
                self._handles[file] = safe_open(self.path / file, framework="pt")
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise InputError(f"{self.path / file}: cannot read tensor {name} ({e})") from e

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """The weights of decoder layer i (buffers IGNORED left out), keyed without the
        `model.layers.{i}.` prefix. The memory maps are dropped afterwards, so the pages they
        touched do not pile up layer after layer."""
        prefix = f"model.layers.{i}."
        state = {n[len(prefix):]: self.tensor(n) for n in self.weight_map
                 if n.startswith(prefix) and not n.endswith(IGNORED)}
        self._handles.clear()
        return state

    def embedded(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Token windows [n, T] through the embedding: [n, T, dim] in `dtype` on the host, a
        window at a time (the stored table is never copied whole)."""
        E = self.tensor("model.embed_tokens.weight")  # [V, dim], memory-mapped
        return torch.stack([F.embedding(t, E).to(dtype) for t in tokens])

    def release(self) -> None:
        """Drop the memory maps, so the pages read so far stop counting as this process's
        (gguf reads tensor by tensor and calls it after each)."""
        self._handles.clear()

    def lm_head(self) -> torch.Tensor:
        """The output projection (the embedding when tied)."""
        if "lm_head.weight" in self.weight_map:
            return self.tensor("lm_head.weight")
        return self.tensor("model.embed_tokens.weight")
