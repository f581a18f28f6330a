"""Chat formats and infilling against Meta's own encodings.

The references below are written from Meta's code, not from pipeline/core/chat.py: Llama 2's
`chat_completion` (llama/generation.py), Llama 3's `ChatFormat.encode_dialog_prompt`
(llama3/llama/tokenizer.py) and Code Llama's `infilling_prompt_tokens` / `encode_infilling`
(codellama/llama/generation.py, tokenizer.py), run on sentencepiece and tiktoken directly. The
converted tokenizer must give exactly those ids through `AutoTokenizer(...).apply_chat_template`
in transformers 5.x (this process) and 4.x (a subprocess in .venv-tf4, built by `make install`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import sentencepiece as spm
import tiktoken
from click.testing import CliRunner
from meta_chat import meta_codellama70b_dialog
from meta_fixtures import (CODELLAMA_INFILL, LLAMA3_PATTERN, STEP_ID, build_checkpoint,
                           padded_sentencepiece_model, sentencepiece_model,
                           step_sentencepiece_model, tiktoken_model)
from sentencepiece import sentencepiece_model_pb2 as pb
from tiktoken.load import load_tiktoken_bpe
from transformers import AutoTokenizer

from pipeline import card
from pipeline.cli import cli
from pipeline.convert import convert
from pipeline.core import chat
from pipeline.core.errors import InputError
from pipeline.core.tokenizer import convert_tokenizer
from pipeline.recipe import load_recipe
from verify.report import Report

ROOT = Path(__file__).resolve().parent.parent
TF4_PYTHON = ROOT / ".venv-tf4" / "bin" / "python"

# ---------------------------------------------------------------- Meta's reference encoders

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_llama2_dialog(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """Llama 2's chat_completion: the system message folded into the first user message, each
    (user, answer) pair encoded on its own with BOS and EOS, the last user turn with BOS."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
                  *dialog[2:]]
    assert all(m["role"] == "user" for m in dialog[::2])
    assert all(m["role"] == "assistant" for m in dialog[1::2])
    assert dialog[-1]["role"] == "user"
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [sp.bos_id(), *sp.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} "
                                           f"{answer['content'].strip()} "), sp.eos_id()]
    return tokens + [sp.bos_id(), *sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")]


class MetaLlama3:
    """Llama 3's Tokenizer + ChatFormat: special ids are the number of ranks plus their index in
    Meta's list (begin_of_text 0, start_header_id 6, end_header_id 7, eot_id 9)."""

    def __init__(self, path: Path):
        ranks = load_tiktoken_bpe(str(path))
        self.n = len(ranks)
        names = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
                 7: "<|end_header_id|>", 9: "<|eot_id|>"}
        self.special = {names.get(i, f"<|reserved_{i}|>"): self.n + i for i in range(256)}
        self.enc = tiktoken.Encoding("meta", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def header(self, role: str) -> list[int]:
        return [self.special["<|start_header_id|>"], *self.encode(role),
                self.special["<|end_header_id|>"], *self.encode("\n\n")]

    def dialog_prompt(self, dialog: list[dict]) -> list[int]:
        tokens = [self.special["<|begin_of_text|>"]]
        for m in dialog:
            tokens += [*self.header(m["role"]), *self.encode(m["content"].strip()),
                       self.special["<|eot_id|>"]]
        return tokens + self.header("assistant")


def meta_infilling_prompt(sp: spm.SentencePieceProcessor, prefix: str, suffix: str) -> list[int]:
    """Code Llama's infilling_prompt_tokens (prefix-suffix-middle): encode_infilling(s) is
    sp.encode("☺" + s)[2:], the text without SentencePiece's leading space."""
    pre, suf, mid = (sp.piece_to_id(p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    return [sp.bos_id(), pre, *sp.encode(prefix), suf, *sp.encode("☺" + suffix)[2:], mid]


# ---------------------------------------------------------------- fixtures

DIALOGS = [
    [{"role": "user", "content": "Write a function that reverses a string."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What is 2 + 2?"}],
    # several turns; every text starts (and some end) with whitespace; code, unicode
    [{"role": "system", "content": "  Answer in Python.\n"},
     {"role": "user", "content": " Reverse a list.  "},
     {"role": "assistant", "content": "  def rev(xs):\n    return xs[::-1]\n\n"},
     {"role": "user", "content": "\tNow in place, naïvely? 🦙"},
     {"role": "assistant", "content": " xs.reverse()"},
     {"role": "user", "content": "    and for 日本語 strings?"}],
    [{"role": "user", "content": " a"}, {"role": "assistant", "content": " b "},
     {"role": "user", "content": "c"}],
]
DIALOGS_70B = [  # destination headers, an empty message, an answer ending in whitespace
    [{"role": "system", "content": "Reply in code only."},
     {"role": "user", "content": "Sort a dict by value.", "destination": "assistant"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "ok \n"},
     {"role": "user", "content": "go"}],
]
INFILL = [("def area(r):\n    ", "  return result\n"),
          ('def remove_non_ascii(s: str) -> str:\n    """ ', "\n    return result\n"),
          ("x = 1", " + y")]


def smiley_model(tmp: Path) -> Path:
    """Code Llama 7B/13B's vocabulary layout (32016, infilling pieces at 32007-32010) with "☺" as
    a piece, as in Meta's vocabulary, so Meta's encode_infilling trick works as designed."""
    m = pb.ModelProto()
    m.ParseFromString(padded_sentencepiece_model(32016).read_bytes())
    piece = m.pieces[32011]
    piece.piece, piece.type, piece.score = "☺", pb.ModelProto.SentencePiece.NORMAL, 0.0
    (tmp / "smiley.model").write_bytes(m.SerializeToString())
    return tmp / "smiley.model"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(name) -> (directory, summary, source path) of converted tokenizers, made once."""
    tmp = tmp_path_factory.mktemp("chat")
    sources = {"llama2": ("llama2", sentencepiece_model, "llama2"),
               "codellama": ("codellama", lambda: smiley_model(tmp), "llama2"),
               "llama3": ("llama3", tiktoken_model, "llama3"),
               "llama3.1": ("llama3.1", tiktoken_model, "llama3"),
               "codellama-70b": ("codellama", step_sentencepiece_model, "codellama-70b"),
               "codellama-70b-nostep": ("codellama", lambda: step_sentencepiece_model(False),
                                        "codellama-70b")}
    cache: dict[str, tuple[Path, dict, Path]] = {}

    def get(name: str) -> tuple[Path, dict, Path]:
        if name not in cache:
            family, source, fmt = sources[name]
            d = tmp / name
            d.mkdir()
            cache[name] = d, convert_tokenizer(source(), d, family, 4096, fmt), source()
        return cache[name]

    return get


def config_only_copy(d: Path, tmp: Path) -> Path:
    """The directory without chat_template.jinja: what a transformers 4.x older than that file
    reads (tokenizer_config.json's chat_template)."""
    copy = tmp / f"{d.name}-config-only"
    shutil.copytree(d, copy)
    (copy / "chat_template.jinja").unlink()
    return copy


def reference(name: str, source: Path, dialog: list[dict]) -> list[int]:
    if name.startswith("llama3"):
        return MetaLlama3(source).dialog_prompt(dialog)
    sp = spm.SentencePieceProcessor(model_file=str(source))
    if name == "codellama-70b":
        return meta_codellama70b_dialog(sp, dialog)
    return meta_llama2_dialog(sp, dialog)


def chat_ids(tok, dialog: list[dict]) -> list[int]:
    return tok.apply_chat_template(dialog, add_generation_prompt=True, return_dict=False)


# ---------------------------------------------------------------- transformers 5.x

@pytest.mark.parametrize("name", ["llama2", "codellama", "llama3", "llama3.1", "codellama-70b"])
@pytest.mark.parametrize("route", ["chat_template.jinja", "tokenizer_config.json"])
def test_chat_template_gives_metas_ids(converted, tmp_path, name, route):
    d, _, source = converted(name)
    tok = AutoTokenizer.from_pretrained(d if route == "chat_template.jinja"
                                        else config_only_copy(d, tmp_path))
    for dialog in DIALOGS + (DIALOGS_70B if name == "codellama-70b" else []):
        assert chat_ids(tok, dialog) == reference(name, source, dialog), dialog


def test_codellama_70b_format(converted):
    """Meta inserts an empty system turn (the published template may not: the references differ),
    stops at <step> as well as EOS, and renders on a vocabulary without <step> (as text)."""
    d, summary, source = converted("codellama-70b")
    sp = spm.SentencePieceProcessor(model_file=str(source))
    tok = AutoTokenizer.from_pretrained(d)
    dialog = DIALOGS[0]
    assert dialog[0]["role"] == "user"
    ids = chat_ids(tok, dialog)
    assert ids == meta_codellama70b_dialog(sp, dialog)
    assert ids[1:1 + len(sp.encode(" Source: system"))] == sp.encode(" Source: system")
    assert ids.count(STEP_ID) == 2  # the inserted system turn and the user's
    assert summary["stop_ids"] == [2, STEP_ID]
    text = tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
    assert text == ("<s> Source: system<step> Source: user \n\n Write a function that reverses a "
                    "string.<step> Source: assistant\nDestination: user \n\n ")
    d, summary, _ = converted("codellama-70b-nostep")
    tok = AutoTokenizer.from_pretrained(d)
    assert summary["stop_ids"] == [2] and tok.convert_tokens_to_ids("<step>") == tok.unk_token_id
    assert "<step>" in tok.decode(chat_ids(tok, dialog))


@pytest.mark.parametrize("name", ["llama2", "llama3.1"])
def test_template_survives_save_pretrained(converted, tmp_path, name):
    """transformers saves the template (chat_template.jinja) and loads it back unchanged."""
    d, _, source = converted(name)
    AutoTokenizer.from_pretrained(d).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").read_text() == \
        (d / "chat_template.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert [chat_ids(tok, dl) for dl in DIALOGS] == [reference(name, source, dl) for dl in DIALOGS]


def test_references_see_what_a_template_could_get_wrong(converted):
    """Negative controls: no generation prompt, content not stripped (Llama 3), and the system
    prompt stripped on its own instead of folded into the first user turn and stripped with it
    (Llama 2) each give other ids than Meta's."""
    d, _, source = converted("llama3.1")
    tok = AutoTokenizer.from_pretrained(d)
    dialog = DIALOGS[2]
    want = reference("llama3.1", source, dialog)
    assert tok.apply_chat_template(dialog, add_generation_prompt=False, return_dict=False) != want
    assert tok.apply_chat_template(dialog, add_generation_prompt=True, return_dict=False,
                                   chat_template=chat.LLAMA3_TEMPLATE.replace(" | trim", "")
                                   ) != want
    d, _, source = converted("llama2")
    sp = spm.SentencePieceProcessor(model_file=str(source))
    stripped_apart = [{**m, "content": m["content"].strip()} for m in dialog]
    assert meta_llama2_dialog(sp, stripped_apart) != meta_llama2_dialog(sp, dialog)
    assert chat_ids(AutoTokenizer.from_pretrained(d), dialog) == meta_llama2_dialog(sp, dialog)


def test_llama2_template_rejects_roles_out_of_order(converted):
    from jinja2.exceptions import TemplateError

    tok = AutoTokenizer.from_pretrained(converted("llama2")[0])
    for dialog in ([{"role": "assistant", "content": "hi"}],
                   [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                   [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]):
        with pytest.raises(TemplateError, match="roles must alternate"):
            chat_ids(tok, dialog)


def test_infilling_ids_keep_metas_ids(converted):
    d, summary, source = converted("codellama")
    assert summary["infill"] == {"prefix": 32007, "suffix": 32008, "middle": 32009, "eot": 32010}
    tok = AutoTokenizer.from_pretrained(d)
    for i, piece in CODELLAMA_INFILL.items():
        assert tok.convert_tokens_to_ids(piece) == i


def card_infill_code(infill: dict[str, int]) -> str:
    """The `infill_ids` definition the model card shows (its first Python block)."""
    text = card.part("infill", **{k: str(v) for k, v in infill.items()})
    return text.split("```python\n")[1].split("```")[0]


def test_card_infill_prompt_gives_metas_infilling_ids(converted, tmp_path):
    d, summary, source = converted("codellama")
    sp = spm.SentencePieceProcessor(model_file=str(source))
    m = pb.ModelProto()
    m.ParseFromString(source.read_bytes())
    m.normalizer_spec.add_dummy_prefix = False
    (tmp_path / "nodummy.model").write_bytes(m.SerializeToString())
    nodummy = spm.SentencePieceProcessor(model_file=str(tmp_path / "nodummy.model"))
    namespace = {"tokenizer": AutoTokenizer.from_pretrained(d)}
    exec(card_infill_code(summary["infill"]), namespace)
    for prefix, suffix in INFILL:
        want = meta_infilling_prompt(sp, prefix, suffix)
        assert namespace["infill_ids"](prefix, suffix) == want
        # what encode_infilling means: the suffix without SentencePiece's dummy prefix
        assert want[-1 - len(nodummy.encode(suffix)):-1] == nodummy.encode(suffix)


def test_card_infill_usage_runs(tmp_path):
    """The card's generation code for infilling runs as written on a converted model (a tiny
    random CodeLlama 7B layout: its text is noise, the code path is what is checked)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    summary = convert(build_checkpoint(tmp_path / "meta", "codellama-7b", 1), out)
    text = card.part("infill", **{k: str(v) for k, v in summary["tokenizer"]["infill"].items()})
    definition, usage = (block.split("```")[0] for block in text.split("```python\n")[1:])
    namespace = {"tokenizer": AutoTokenizer.from_pretrained(out),
                 "model": AutoModelForCausalLM.from_pretrained(out)}
    exec(definition + usage.replace("max_new_tokens=128", "max_new_tokens=4"), namespace)
    assert namespace["ids"][0].tolist()[:2] == [1, 32007] and len(namespace["middle"]) <= 4


# ---------------------------------------------------------------- transformers 4.x

def test_transformers_4_gives_the_same_ids(converted, tmp_path):
    """The same directories in transformers 4.x: chat templates from chat_template.jinja and from
    tokenizer_config.json alone, plain text (leading spaces, unicode) and the card's infilling
    code, all equal to Meta's ids."""
    assert TF4_PYTHON.is_file(), f"{TF4_PYTHON} missing: run `make install` (builds .venv-tf4)"
    texts = ["  two leading spaces", "def f(x):\n\treturn x  # ünïcode 日本語 🦙", " ", ""]
    cases, want = [], []
    for name in ("llama2", "codellama", "llama3", "llama3.1", "codellama-70b"):
        d, summary, source = converted(name)
        dialogs = DIALOGS + (DIALOGS_70B if name == "codellama-70b" else [])
        if name.startswith("llama3"):
            meta = MetaLlama3(source)
            text_ids = [[meta.n, *meta.encode(t)] for t in texts]
        else:
            sp = spm.SentencePieceProcessor(model_file=str(source))
            text_ids = [[sp.bos_id(), *sp.encode(t)] for t in texts]
        infill = summary["infill"] is not None
        for directory in (d, config_only_copy(d, tmp_path)):
            cases.append({"dir": str(directory), "dialogs": dialogs, "texts": texts,
                          "infill": INFILL if infill else [],
                          "infill_code": card_infill_code(summary["infill"]) if infill else None})
            want.append({"class": "PreTrainedTokenizerFast",
                         "chat": [reference(name, source, dl) for dl in dialogs], "text": text_ids,
                         **({"infill": [meta_infilling_prompt(sp, p, s) for p, s in INFILL]}
                            if infill else {})})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": cases}))
    run = subprocess.run([str(TF4_PYTHON), str(ROOT / "tests" / "tf4_tokenize.py"), str(spec)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["transformers"].startswith("4.")
    for case, got, expected in zip(cases, out["results"], want):
        assert got == expected, case["dir"]


# ---------------------------------------------------------------- convert, cards, recipes, judge

@pytest.mark.parametrize("spec,fmt,stops", [
    ("llama2", "llama2", lambda n: [2]),
    ("codellama-7b", "llama2", lambda n: [2]),
    ("llama3", "llama3", lambda n: [n + 1, n + 9]),             # end_of_text, eot_id
    ("llama3.1", "llama3", lambda n: [n + 1, n + 8, n + 9]),    # + eom_id (3.1)
    ("llama3.1", "none", lambda n: [n + 1]),
])
def test_convert_writes_stop_and_pad_ids(tmp_path, spec, fmt, stops):
    src = build_checkpoint(tmp_path / "meta", spec, 1)
    out = tmp_path / "hf"
    summary = convert(src, out, chat_format=fmt)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    n = 512 if spec.startswith("llama3") else None  # the tiktoken fixture's 512 ranks
    assert gen["eos_token_id"] == stops(n)
    # pad: an existing token, never EOS, the same id everywhere; nothing added to the vocabulary
    pad = n + 4 if n else 0
    assert cfg["pad_token_id"] == gen["pad_token_id"] == tok.pad_token_id == pad
    assert tok.pad_token == ("<|finetune_right_pad_id|>" if spec == "llama3.1" else
                             "<|reserved_special_token_2|>" if spec == "llama3" else "<unk>")
    assert len(tok) == cfg["vocab_size"] and pad not in gen["eos_token_id"]
    assert summary["tokenizer"]["chat_format"] == fmt
    assert (out / "chat_template.jinja").is_file() == (fmt != "none")
    assert (tok.chat_template is not None) == (fmt != "none")


def test_convert_cli_chat_format(tmp_path):
    src = build_checkpoint(tmp_path / "meta", "llama2", 1)
    ok = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "hf"), "--chat-format",
                                  "llama2", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["tokenizer"]["chat_format"] == "llama2"
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    assert chat_ids(tok, DIALOGS[1]) == meta_llama2_dialog(sp, DIALOGS[1])
    with pytest.raises(InputError, match="a sentencepiece tokenizer, but chat format 'llama3'"):
        convert(src, tmp_path / "hf3", chat_format="llama3")  # InputError: exit 2 at the CLI
    assert not (tmp_path / "hf3").exists()


def test_prompt_template_is_the_tokenizers_template(converted):
    """What cards show (recipe prompt_template, derived) is the chat template for one message:
    tokenizer(text with the user's message) gives apply_chat_template's ids, i.e. Meta's."""
    assert chat.prompt_template("llama2") == "[INST] {prompt} [/INST]"  # Meta's format
    assert chat.prompt_template("llama3") == ("<|start_header_id|>user<|end_header_id|>\n\n"
                                              "{prompt}<|eot_id|><|start_header_id|>assistant"
                                              "<|end_header_id|>\n\n")
    assert chat.prompt_template("none") == "{prompt}"
    for name, fmt in (("llama2", "llama2"), ("llama3.1", "llama3")):
        d, _, source = converted(name)
        tok = AutoTokenizer.from_pretrained(d)
        for text in ("Write a function that reverses a string.", " spaced\n", "日本語 🦙"):
            want = reference(name, source, [{"role": "user", "content": text}])
            prompt = chat.prompt_template(fmt).replace("{prompt}", text.strip())  # as Meta's
            assert tok(prompt)["input_ids"] == want
            assert tok(chat.chat_prompt(tok, text))["input_ids"] == want  # verify's chat prompts


def test_chat_prompt_needs_a_chat_template(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    convert_tokenizer(sentencepiece_model(), d, "llama2", 4096)
    with pytest.raises(InputError, match="no chat template"):
        chat.chat_prompt(AutoTokenizer.from_pretrained(d), "hi")


RECIPE = """
[model]
name = "Tiny-Chat"
{model}

[source]
path = "meta"

[calibration]
source = "calib"

[[variants]]
branch = "main"
bits = 4

[verify]
eval = "eval"
{verify}

[publish]
fp16_repo = "org/Tiny-Chat-fp16"
gptq_repo = "org/Tiny-Chat-GPTQ"
"""


def write_recipe(tmp_path: Path, model: str = "", verify: str = "") -> Path:
    for d in ("meta", "calib", "eval"):
        (tmp_path / d).mkdir(exist_ok=True)
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(model=model, verify=verify))
    return path


@pytest.mark.parametrize("model,verify,message", [
    ('chat_format = "llama4"', "", r"chat_format = 'llama4': must be one of llama2, llama3, codellama-70b, none"),
    ('chat_format = "llama2"\nprompt_template = "[INST] {prompt} [/INST]"', "",
     "prompt_template is derived from chat_format"),
    ("", 'chat_prompts = ["hi"]', r"chat_prompts needs a \[model\] chat_format"),
])
def test_recipe_chat_errors(tmp_path, model, verify, message):
    with pytest.raises(InputError, match=message):
        load_recipe(write_recipe(tmp_path, model, verify))


def test_shipped_chat_recipes():
    formats = {"llama-2-7b-chat": "llama2", "llama-2-13b-chat": "llama2",
               "llama-2-70b-chat": "llama2", "llama-3.1-8b-instruct": "llama3",
               "codellama-7b-instruct": "llama2", "codellama-13b-instruct": "llama2",
               "codellama-34b-instruct": "llama2", "demo": "llama2", "llama-2-7b": "none",
               "codellama-7b": "none", "llama-3.1-8b": "none"}
    for name, fmt in formats.items():
        r = load_recipe(ROOT / "recipes" / f"{name}.toml")
        assert r.model.chat_format == fmt, name
        assert r.model.prompt_template == chat.prompt_template(fmt), name
        assert bool(r.verify.chat_prompts) == (fmt != "none"), name


def test_demo_converts_with_its_chat_format(tmp_path):
    """The shipped demo model, converted as its recipe says (llama2, as CodeLlama-Instruct), with
    its own trained SentencePiece vocabulary: Meta's ids for every dialog."""
    from demo_model import META

    fmt = load_recipe(ROOT / "recipes" / "demo.toml").model.chat_format
    convert(META, tmp_path / "fp16", chat_format=fmt)
    tok = AutoTokenizer.from_pretrained(tmp_path / "fp16")
    sp = spm.SentencePieceProcessor(model_file=str(META / "tokenizer.model"))
    assert fmt == "llama2"
    for dialog in DIALOGS:
        assert chat_ids(tok, dialog) == meta_llama2_dialog(sp, dialog), dialog


REPORT = Report(passed=True, device="cpu", dtype="float32", checks=[], artifacts={},
                eval={"source": "eval.py", "files": [], "windows": 4, "seqlen": 256, "tokens": 1024},
                perplexity={"fp16": 7.5}, tokens_per_second=1.0)


@pytest.mark.parametrize("fmt", ["none", "llama2", "llama3"])
def test_card_prompt_section_follows_the_chat_format(tmp_path, fmt):
    r = load_recipe(write_recipe(tmp_path, f'chat_format = "{fmt}"',
                                 'chat_prompts = ["hi"]' if fmt != "none" else ""))
    infill = {"prefix": 32007, "suffix": 32008, "middle": 32009, "eot": 32010}
    for ids in (None, infill):
        text = card.fp16_card(r, {"model.safetensors": 10}, REPORT, "llama", "https://hub",
                              card.ModelFacts(ids))
        section = text.split("## Prompt template\n\n")[1].split("\n## ")[0]
        assert section.startswith(f"```\n{chat.prompt_template(fmt)}\n```")
        assert ("apply_chat_template" in section) == (fmt != "none")
        assert ("PRE, SUF, MID, EOT = 32007, 32008, 32009, 32010" in section) == (ids is not None)
        assert f"prompt_template: {json.dumps(chat.prompt_template(fmt))}" in text  # metadata


def test_verify_sends_chat_prompts_through_the_template(tmp_path):
    """verify's generation check gets each chat prompt as the chat template renders it (the
    prompt recorded is that text; tokenised it is Meta's dialog encoding)."""
    from meta_fixtures import corpus

    from verify.stage import judge

    src = build_checkpoint(tmp_path / "meta", "llama2", 1)
    convert(src, tmp_path / "fp16", chat_format="llama2")
    (tmp_path / "eval.txt").write_text(corpus()[:6000])
    report = judge(fp16=tmp_path / "fp16", eval_text=str(tmp_path / "eval.txt"),
                    out=tmp_path / "v", seqlen=64, max_windows=2, prompts=["def main():"],
                    chat_prompts=[" Reverse a string."])
    (gen,) = [c for c in report.checks if c.check == "generation"]
    assert [s["prompt"] for s in gen.samples] == ["def main():", "[INST] Reverse a string. [/INST]"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "fp16")
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    assert tok(gen.samples[1]["prompt"])["input_ids"] == \
        meta_llama2_dialog(sp, [{"role": "user", "content": " Reverse a string."}])
    convert(src, tmp_path / "plain")
    with pytest.raises(InputError, match="no chat template"):
        judge(fp16=tmp_path / "plain", eval_text=str(tmp_path / "eval.txt"), out=tmp_path / "w",
               seqlen=64, max_windows=2, chat_prompts=["hi"])
