"""The demo model's pieces in a cheap configuration: the standard-library split, the tokenizer's
Llama settings, training, and the cached Meta-format checkpoint (the full demo is not run here)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as pb

from pipeline.demo import (DemoSettings, ensure_model, stdlib_split, token_stream, train,
                           train_tokenizer)
from pipeline.recipe import load_recipe

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
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "demo.toml"
    path.write_text(textwrap.dedent("""
        [model]
        name = "demo"
        [source]
        path = "../cache/meta"
        [calibration]
        source = "../cache/text/calib"
        [[variants]]
        branch = "main"
        bits = 4
        group_size = 32
        [verify]
        eval = "../cache/text/eval"
        [publish]
        fp16_repo = "o/a"
        gptq_repo = "o/b"
        """))
    return path


def test_ensure_model_writes_a_cached_meta_checkpoint(tmp_path):
    stdlib = fake_stdlib(tmp_path / "lib")
    recipe = load_recipe(demo_recipe(tmp_path))
    info = ensure_model(recipe, TINY, stdlib=stdlib)
    assert not info["reused"] and info["key"] == TINY.key()
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
    assert sorted(p.name for p in (text / "eval").iterdir()) == ["json.__init__.py", "json.tool.py"]
    assert sorted(p.name for p in (text / "calib").iterdir()) == [
        "logging.__init__.py", "logging.handlers.py"]

    mtime = (meta / "consolidated.00.pth").stat().st_mtime_ns
    again = ensure_model(recipe, TINY, stdlib=stdlib)
    assert again["reused"] and (meta / "consolidated.00.pth").stat().st_mtime_ns == mtime
    other = DemoSettings(**{**TINY.__dict__, "steps": 2})
    assert other.key() != TINY.key()
    assert not ensure_model(recipe, other, stdlib=stdlib)["reused"]
    assert json.loads((tmp_path / "cache" / "settings.json").read_text())["key"] == other.key()


def test_demo_paths_must_lie_in_one_cache(tmp_path):
    path = demo_recipe(tmp_path)
    path.write_text(path.read_text().replace("../cache/text/eval", "../elsewhere/eval"))
    from pipeline.errors import InputError
    with pytest.raises(InputError, match="eval path .*elsewhere.* must lie under"):
        ensure_model(load_recipe(path), TINY, stdlib=fake_stdlib(tmp_path / "lib"))
