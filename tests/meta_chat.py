"""CodeLlama 70B's dialog encoding written from Meta's code (codellama/llama/generation.py
`chat_completion` and `dialog_prompt_tokens`), run on sentencepiece directly: the independent
reference the chat template's ids are judged against (tests/test_chat.py, tests/test_family.py)."""

from __future__ import annotations

import sentencepiece as spm


def meta_codellama70b_dialog(sp: spm.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """CodeLlama 70B's chat_completion (codellama/llama/generation.py): an empty system message
    first when the dialog has none; then dialog_prompt_tokens: BOS, per message the header
    " Source: ROLE" ("\\nDestination: D" when given) and, when it has content, the body
    "\\n\\n " + content.strip(), each encoded on its own, then the <step> id; the reply's header
    " Source: assistant\\nDestination: user" and "\\n\\n ", each encoded on its own."""
    step = sp.piece_to_id("<step>") or None
    assert step is not None
    if dialog[0]["role"] != "system":
        dialog = [{"role": "system", "content": ""}, *dialog]
    assert all(m["role"] == "user" for m in dialog[1::2])
    assert all(m["role"] == "assistant" for m in dialog[2::2])
    assert dialog[-1]["role"] == "user"
    tokens = [sp.bos_id()]
    for m in dialog:
        headers = [f"Source: {m['role'].strip()}"]
        if m.get("destination") is not None:
            headers.append(f"Destination: {m['destination'].strip()}")
        tokens += sp.encode(" " + "\n".join(headers))
        if m["content"]:
            tokens += sp.encode("\n\n " + m["content"].strip())
        tokens.append(step)
    return tokens + sp.encode(" Source: assistant\nDestination: user") + sp.encode("\n\n ")
