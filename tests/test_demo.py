"""The demo model's pieces in a cheap configuration: the standard-library split, the tokenizer's
Llama settings, training, and the Meta-format checkpoint `--retrain` writes; then the shipped
model's golden values."""

from __future__ import annotations

import glob
import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from demo_model import DEMO, EVAL, META
from sentencepiece import sentencepiece_model_pb2 as pb

from pipeline.core.errors import InputError
from pipeline.demo import (DemoSettings, retrain_model, shipped_model, stdlib_split, token_stream,
                           train, train_tokenizer)
from pipeline.recipe import load_recipe
from verify.meta_reference import meta_logits

CODE = textwrap.dedent('''
    import os


    def walk(top, depth=0):
        """Yield every file below top, with its depth."""
        for name in sorted(os.listdir(top)):
            path = os.path.join(top, name)
            if os.path.isdir(path):
                yield from walk(path, depth + 1)
            else:
                yield path, depth


    class Counter:
        def __init__(self):
            self.counts = {}

        def add(self, key, n=1):
            self.counts[key] = self.counts.get(key, 0) + n
            return self.counts[key]
''')

TINY = DemoSettings(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=320,
                    seqlen=32, batch=4, steps=3, warmup=2, tokenizer_chars=200_000,
                    eval_packages=("json",), calib_packages=("logging",))


def fake_stdlib(root: Path) -> Path:
    """A small standard-library-shaped tree: modules, packages, tests and caches to skip."""
    files = {
        "os_like.py": CODE, "walker.py": CODE.replace("walk", "visit"),
        "json/__init__.py": CODE.replace("Counter", "Decoder"), "json/tool.py": CODE,
        "logging/__init__.py": CODE.replace("add", "log"), "logging/handlers.py": CODE,
        "asyncio/events.py": CODE.replace("top", "loop") * 3,
        "test/test_os.py": "SKIPPED = 1\n", "json/tests/test_x.py": "SKIPPED = 2\n",
        "__pycache__/x.py": "SKIPPED = 3\n", "site-packages/pkg/mod.py": "SKIPPED = 4\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": "SKIPPED = 5\n",
        "notes.txt": "not python\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text * 20)
    return root


def test_stdlib_split_holds_out_eval_packages(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    split = {k: sorted(p.relative_to(root).as_posix() for p in v)
             for k, v in stdlib_split(root, TINY).items()}
    assert split["eval"] == ["json/__init__.py", "json/tool.py"]
    assert split["calib"] == ["logging/__init__.py", "logging/handlers.py"]
    assert split["train"] == ["asyncio/events.py", "logging/__init__.py", "logging/handlers.py",
                              "os_like.py", "walker.py"]


def test_tokenizer_has_llama_settings_and_round_trips_code():
    model = train_tokenizer([CODE * 30], vocab_size=320, max_chars=100_000)
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    n, t = proto.normalizer_spec, proto.trainer_spec
    assert n.name == "identity" and not n.remove_extra_whitespaces and n.add_dummy_prefix
    assert t.byte_fallback and t.split_digits and t.model_type == pb.TrainerSpec.BPE
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert sp.vocab_size() == 320
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    text = "def f(x):\n\tif x  >  10:\n        return 'ü'\n"
    assert sp.decode(sp.encode(text)) == text   # whitespace and unseen characters survive
    ids = token_stream([text, text], model)
    assert ids.dtype == torch.int32 and (ids == 1).sum() == 2 and ids[0] == 1


def test_training_lowers_the_loss():
    model = train_tokenizer([CODE * 30], vocab_size=320, max_chars=100_000)
    ids = token_stream([CODE * 30], model)
    settings = DemoSettings(**{**TINY.__dict__, "steps": 40, "warmup": 5, "lr": 1e-2})
    state, log = train(settings, ids, ids[:2000], progress=False)
    assert len(log["losses"]) == 40
    assert log["losses"][0] > 5.0                     # ~ln(320) at the start
    assert log["final_loss"] < log["losses"][0] - 1.5  # and it learns the repeated text
    assert state["layers.1.attention.wk.weight"].shape == (2 * 8, 32)  # GQA: 2 kv heads × hd 8
    assert state["output.weight"].shape == (320, 32)


def demo_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "demo.toml"  # beside cache/: a recipe names files in its own folder only
    path.write_text(textwrap.dedent("""
        [model]
        name = "demo"
        [source]
        path = "cache/meta"
        [calibration]
        source = "cache/text/calib"
        [[variants]]
        branch = "main"
        bits = 4
        group_size = 32
        [verify]
        eval = "cache/text/eval"
        [publish]
        fp16_repo = "o/a"
        gptq_repo = "o/b"
        """))
    return path


def test_retrain_writes_a_meta_checkpoint_and_its_text(tmp_path):
    stdlib = fake_stdlib(tmp_path / "lib")
    recipe = load_recipe(demo_recipe(tmp_path))
    info = retrain_model(recipe, TINY, stdlib=stdlib)
    assert info["settings"]["dim"] == 32 and info["train"]["steps"] == 3
    meta = tmp_path / "cache" / "meta"
    params = json.loads((meta / "params.json").read_text())
    assert params["rope_theta"] == 1e6 and params["n_kv_heads"] == 2 and params["vocab_size"] == 320
    assert sorted(p.name for p in meta.iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    shards = [torch.load(meta / f"consolidated.0{r}.pth", weights_only=True) for r in range(2)]
    for s in shards:  # fairscale's split: column-parallel rows, row-parallel columns, embedding dim
        assert s["layers.0.attention.wq.weight"].shape == (16, 32)
        assert s["layers.0.attention.wk.weight"].shape == (8, 32)
        assert s["layers.0.attention.wo.weight"].shape == (32, 16)
        assert s["layers.1.feed_forward.w2.weight"].shape == (32, 48)   # ffn 96 split in two
        assert s["tok_embeddings.weight"].shape == (320, 16)
        assert s["norm.weight"].shape == (32,)
        assert all(t.dtype == torch.bfloat16 for t in s.values())
    assert torch.equal(shards[0]["norm.weight"], shards[1]["norm.weight"])
    sp = spm.SentencePieceProcessor(model_file=str(meta / "tokenizer.model"))
    assert sp.vocab_size() == 320
    text = tmp_path / "cache" / "text"
    assert sorted(p.name for p in (text / "eval").iterdir()) == ["json.__init__.py.txt", "json.tool.py.txt"]
    assert sorted(p.name for p in (text / "calib").iterdir()) == [
        "logging.__init__.py.txt", "logging.handlers.py.txt"]
    assert shipped_model(recipe) == json.loads(json.dumps(info))   # what the demo reads back


def test_retrain_refuses_a_directory_it_did_not_write(tmp_path):
    recipe = load_recipe(demo_recipe(tmp_path))
    precious = tmp_path / "cache" / "precious.bin"
    precious.parent.mkdir()
    precious.write_bytes(b"keep")
    with pytest.raises(InputError, match="not a demo model this tool wrote"):
        retrain_model(recipe, TINY, stdlib=fake_stdlib(tmp_path / "lib"))
    assert precious.read_bytes() == b"keep"


def test_a_missing_shipped_model_says_how_to_get_it_back(tmp_path):
    with pytest.raises(InputError, match="incomplete .*--retrain"):
        shipped_model(load_recipe(demo_recipe(tmp_path)))


def test_demo_paths_must_lie_in_one_directory(tmp_path):
    path = demo_recipe(tmp_path)
    path.write_text(path.read_text().replace("cache/text/eval", "elsewhere/eval"))
    with pytest.raises(InputError, match="eval path .*elsewhere.* must lie under"):
        shipped_model(load_recipe(path))


# The shipped model's golden value (llama2.c style): Meta's own math on the committed shards,
# first 4 × 256 tokens of the held-out text, tokenised by SentencePiece itself. Measured once
# (float32, double-precision loss); float32 summation order differs between CPUs by ~1e-6
# relative, so 1e-4 is a wide margin, while any change to the weights or text moves it far more.
GOLDEN_NLL = 4.375219407246018
GOLDEN_TOP = 1954  # argmax after the first window


def test_shipped_model_matches_its_checklist_and_settings():
    lines = (META / "checklist.chk").read_text().split("\n")
    sums = dict(reversed(line.split()) for line in lines if line.strip())
    assert sorted(sums) == sorted(p.name for p in META.iterdir() if p.name != "checklist.chk")
    for name, md5 in sums.items():
        assert hashlib.md5((META / name).read_bytes()).hexdigest() == md5, name
    settings = json.loads((DEMO / "settings.json").read_text())["settings"]
    assert DemoSettings(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in settings.items()}).params() == \
        json.loads((META / "params.json").read_text())


def test_shipped_model_golden_loss():
    sp = spm.SentencePieceProcessor(model_file=str(META / "tokenizer.model"))
    texts = [Path(p).read_text() for p in sorted(glob.glob(EVAL))]
    ids = [sp.bos_id()] + sp.encode("\n\n".join(texts))
    x = torch.tensor(ids[:4 * 256]).view(4, 256)
    logits = meta_logits(META, x).double()
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert abs(float(nll) / GOLDEN_NLL - 1) < 1e-4, float(nll)
    assert int(logits[0, -1].argmax()) == GOLDEN_TOP
