"""Run under .venv-tf4 (transformers 4.x, `make install`): load each converted tokenizer directory
of a JSON spec with AutoTokenizer and print, as one JSON object, the ids it gives for the spec's
dialogs (apply_chat_template), texts and infilling prompts (the card's `infill_ids` code), so the
tests compare them with Meta's encodings. Uses nothing of the pipeline (which needs 5.x)."""

from __future__ import annotations

import json
import sys


def main(spec_path: str) -> None:
    import transformers
    from transformers import AutoTokenizer

    spec = json.loads(open(spec_path, encoding="utf-8").read())
    results = []
    for case in spec["cases"]:
        tok = AutoTokenizer.from_pretrained(case["dir"])
        got = {"class": type(tok).__name__,
               "chat": [tok.apply_chat_template(d, add_generation_prompt=True, tokenize=True,
                                                return_dict=False) for d in case["dialogs"]],
               "text": [tok(t)["input_ids"] for t in case["texts"]]}
        if case.get("infill_code"):
            namespace = {"tokenizer": tok}
            exec(case["infill_code"], namespace)
            got["infill"] = [namespace["infill_ids"](p, s) for p, s in case["infill"]]
        results.append(got)
    print(json.dumps({"transformers": transformers.__version__, "results": results}))


if __name__ == "__main__":
    main(sys.argv[1])
