"""A small but actually trained Hugging Face Llama directory for tests (quantize, verify): a
SentencePiece tokenizer and a 2-layer GQA model trained on structured synthetic code, plus the
calibration and eval text as files. Deterministic; built once per process, copied afterwards."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 384,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 1024,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float16",
}
# A tiny init makes the trained weights mostly learned structure, so quantisation noise matters:
# 3-bit RTN raises perplexity clearly while GPTQ stays close, as on real LLMs.
SEQLEN, BATCH, STEPS, LR, INIT = 128, 8, 200, 1e-2, 1e-3
NAMES = ["x", "y", "n", "total", "count", "items", "value", "key", "result", "data", "index"]
OPS = ["+", "-", "*", "//", "%"]
_BUILT: list[Path] = []  # process-wide cache: the first build, copied for later callers


def _function(rng: random.Random) -> str:
    """One small Python function with regular structure (loops, arithmetic, returns)."""
    a, b, c = rng.sample(NAMES, 3)
    k, m = rng.randint(1, 99), rng.randint(2, 9)
    op = rng.choice(OPS)
    body = rng.choice([
        f"    {c} = 0\n    for i in range({a}):\n        {c} = {c} {op} i * {m}\n    return {c}\n",
        f"    if {a} > {k}:\n        return {a} {op} {b}\n    return {b} {op} {k}\n",
        f"    {c} = [{a} {op} i for i in range({m})]\n    return sum({c}) + {k}\n",
        f"    while {a} < {k}:\n        {a} = {a} * {m}\n    return {a} {op} {b}\n",
    ])
    return f"def {rng.choice(NAMES)}_{k}({a}, {b}):\n{body}\n"


def write_corpus(directory: Path, name: str, seed: int, n_functions: int) -> Path:
    rng = random.Random(seed)
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_function(rng) for _ in range(n_functions)))
    return path


def calibration_glob(directory: Path) -> str:
    """The calibration text of a directory made by make_trained_model (a glob)."""
    return str(Path(directory) / "text" / "calibration" / "*.py")


def eval_glob(directory: Path) -> str:
    """The held-out evaluation text of a directory made by make_trained_model (a glob)."""
    return str(Path(directory) / "text" / "eval" / "*.py")


def write_tokenizer(text: Path, out: Path) -> None:
    """SentencePiece BPE with Llama's normaliser settings, converted through AutoTokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()  # trained from memory: no paths recorded in the model, same bytes anywhere
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.read_text().splitlines()), model_writer=model,
        vocab_size=CONFIG["vocab_size"], model_type="bpe", character_coverage=1.0,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False,
        "model_max_length": CONFIG["max_position_embeddings"]}, indent=2))
    AutoTokenizer.from_pretrained(out).save_pretrained(out)


def _train(out: Path, tokens: torch.Tensor) -> None:
    """Train LlamaForCausalLM on random windows of `tokens`; save config + model.safetensors."""
    torch.manual_seed(0)
    cfg = {k: v for k, v in CONFIG.items() if k not in ("architectures", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg, initializer_range=INIT))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=STEPS, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        starts = torch.randint(0, tokens.numel() - SEQLEN, (BATCH,), generator=g)
        x = torch.stack([tokens[s:s + SEQLEN] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "max_length": 1024}, indent=2) + "\n")


def make_trained_model(directory: Path) -> Path:
    """Build (or copy this process's earlier build of) the trained model into `directory`;
    returns `directory/model`. Text: calibration_glob(directory), eval_glob(directory)."""
    directory = Path(directory)
    if _BUILT and (_BUILT[0] / "model" / "model.safetensors").is_file():
        src = _BUILT[0]
        for part in ("model", "text"):
            shutil.copytree(src / part, directory / part, dirs_exist_ok=True)
        return directory / "model"
    text = directory / "text"
    train = write_corpus(text, "train/train.py", seed=1, n_functions=4000)
    write_corpus(text, "calibration/calibration.py", seed=2, n_functions=600)
    write_corpus(text, "eval/eval.py", seed=3, n_functions=300)
    out = directory / "model"
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(train, out)
    tok = AutoTokenizer.from_pretrained(out)
    tokens = torch.tensor(tok(train.read_text(), verbose=False)["input_ids"], dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float summation order on every machine: same weights
    try:
        _train(out, tokens)
    finally:
        torch.set_num_threads(threads)
    _BUILT[:] = [directory]
    return out
