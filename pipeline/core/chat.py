"""Chat formats: Meta's dialog encodings as Jinja chat templates (what transformers, vLLM and TGI
apply), the extra stop tokens each needs, and the prompt text cards and verify show. One source:
the tokenizer files, generation_config.json, the card and verify all read their format from here.

- `llama2` (Llama 2-Chat, CodeLlama-Instruct; Meta's `chat_completion`): a leading system message
  folded into the first user turn as `<<SYS>>\\n...\\n<</SYS>>\\n\\n`; each exchange
  `<s>[INST] {user} [/INST] {answer} </s>`, the last user turn `<s>[INST] {user} [/INST]`; every
  text stripped. Each piece starts after a special token, so the tokenizer gives it SentencePiece's
  dummy prefix, as Meta's per-exchange `encode` does.
- `llama3` (Llama 3.x Instruct; Meta's `ChatFormat.encode_dialog_prompt`): `<|begin_of_text|>`, per
  message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, then the assistant
  header. No default system message (Meta's code adds none).
- `codellama-70b` (CodeLlama 70B Instruct; Meta's `dialog_prompt_tokens` in codellama's
  llama/generation.py): `<s>`, per message ` Source: {role}` (`\\nDestination: {d}` when the message
  names one), then, when it has content, `\\n\\n {content}`, then `<step>`; the reply starts with
  ` Source: assistant\\nDestination: user\\n\\n `. Meta encodes each header and body on its own
  (a SentencePiece dummy prefix each); the template writes that prefix as the space before the
  body. A dialog without a system message gets an empty one first, as Meta's `chat_completion`
  inserts. Generation stops at `<step>` (and `</s>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import InputError, PipelineError

# Whitespace control ({%- -%}) everywhere: only the {{ }} expressions produce text.
LLAMA2_TEMPLATE = r"""{#- Meta's Llama 2 chat_completion (also CodeLlama-Instruct) -#}
{%- if messages[0]['role'] == 'system' -%}
    {%- set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
        {{- raise_exception('Llama 2 chat format: after an optional system message, roles must alternate user, assistant, user, ...') -}}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {{- bos_token + '[INST] ' + ((system if loop.first else '') + message['content']) | trim + ' [/INST]' -}}
    {%- else -%}
        {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
    {%- endif -%}
{%- endfor -%}
"""
LLAMA3_TEMPLATE = r"""{#- Meta's Llama 3 ChatFormat.encode_dialog_prompt -#}
{{- bos_token -}}
{%- for message in messages -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""
CODELLAMA_70B_TEMPLATE = r"""{#- Meta's CodeLlama 70B dialog_prompt_tokens, with chat_completion's empty system message -#}
{%- if messages[0]['role'] != 'system' -%}
    {%- set messages = [{'role': 'system', 'content': ''}] + messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if not loop.first and message['role'] != ['assistant', 'user'][loop.index0 % 2] -%}
        {{- raise_exception('CodeLlama 70B chat format: a system message, then roles alternating user, assistant, user, ...') -}}
    {%- endif -%}
    {{- ' Source: ' + message['role'] | trim -}}
    {%- if message['destination'] is defined and message['destination'] is not none -%}
        {{- '
Destination: ' + message['destination'] | trim -}}
    {%- endif -%}
    {%- if message['content'] -%}
        {{- ' 

 ' + message['content'] | trim -}}
    {%- endif -%}
    {{- '<step>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if messages[-1]['role'] != 'user' -%}
        {{- raise_exception('CodeLlama 70B chat format: the last message must be the user\'s') -}}
    {%- endif -%}
    {{- ' Source: assistant
Destination: user 

 ' -}}
{%- endif -%}
"""


@dataclass(frozen=True)
class ChatFormat:
    """A chat format: its template, the tokenizer kind and BOS/EOS it is written for, and the
    stop tokens it adds to EOS (those the vocabulary has: `<|eom_id|>` exists from Llama 3.1 on)."""

    name: str
    template: str | None
    tokenizer: str | None  # "sentencepiece" / "tiktoken"; None: any
    bos_eos: tuple[str, str] | None
    stop_tokens: tuple[str, ...]
    reference: str = ""  # Meta's code the template reproduces, for the card


CHAT_FORMATS = {
    "llama2": ChatFormat("llama2", LLAMA2_TEMPLATE, "sentencepiece", ("<s>", "</s>"), (),
                         "Llama 2's `chat_completion`: the system prompt inside the first "
                         "`[INST]`, `<s>` and `</s>` around each exchange"),
    "llama3": ChatFormat("llama3", LLAMA3_TEMPLATE, "tiktoken",
                         ("<|begin_of_text|>", "<|end_of_text|>"), ("<|eom_id|>", "<|eot_id|>"),
                         "Llama 3's `ChatFormat.encode_dialog_prompt`, no default system prompt; "
                         "generation stops at `<|eot_id|>` (and `<|eom_id|>` from 3.1 on) as well "
                         "as `<|end_of_text|>` (`eos_token_id` in generation_config.json)"),
    "codellama-70b": ChatFormat("codellama-70b", CODELLAMA_70B_TEMPLATE, "sentencepiece",
                                ("<s>", "</s>"), ("<step>",),
                                "CodeLlama 70B's `dialog_prompt_tokens`: turns introduced by "
                                "`Source: system|user|assistant`, each ended by `<step>`, an empty "
                                "system turn when the dialog has none, and the reply announced as "
                                "`Source: assistant` / `Destination: user`; generation stops at "
                                "`<step>` as well as `</s>`"),
    "none": ChatFormat("none", None, None, None, ()),
}
FORMATS = tuple(CHAT_FORMATS)


def chat_format(name: str) -> ChatFormat:
    """The format called `name`; InputError for an unknown one."""
    if name not in CHAT_FORMATS:
        raise InputError(f"chat format {name!r}: choose one of {', '.join(FORMATS)}")
    return CHAT_FORMATS[name]


def render(template: str, messages: list[dict[str, str]], bos_token: str, eos_token: str) -> str:
    """`template` rendered as transformers renders chat templates (sandboxed, trim_blocks and
    lstrip_blocks, `raise_exception`), with the generation prompt."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos_token, eos_token=eos_token)


def prompt_template(name: str) -> str:
    """The prompt text with `{prompt}` for one user message, as the card shows it: the template's
    output without the leading BOS, which the tokenizer adds (`tokenizer(text)` gives the ids of
    `apply_chat_template`); "{prompt}" for `none`."""
    fmt = chat_format(name)
    if fmt.template is None or fmt.bos_eos is None:
        return "{prompt}"
    bos, eos = fmt.bos_eos
    return render(fmt.template, [{"role": "user", "content": "{prompt}"}], bos, eos
                  ).removeprefix(bos)


def chat_prompt(tokenizer: Any, text: str) -> str:
    """`text` as one user message in the tokenizer's chat template, as a prompt for
    `tokenizer(prompt)` (BOS left to the tokenizer); PipelineError when those ids differ from
    `apply_chat_template`'s, InputError when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{tokenizer.name_or_path}: the tokenizer has no chat template, so chat "
                         "prompts cannot be built (convert with --chat-format, or [model] "
                         "chat_format in the recipe)")
    dialog = [{"role": "user", "content": text}]
    try:
        rendered = tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
        want = tokenizer.apply_chat_template(dialog, add_generation_prompt=True, return_dict=False)
    except Exception as e:  # the template is the model's code: any error it raises is its own
        raise InputError(f"{tokenizer.name_or_path}: its chat template fails on one user message "
                         f"({type(e).__name__}: {e})") from None
    prompt = rendered.removeprefix(tokenizer.bos_token or "")
    if tokenizer(prompt)["input_ids"] != list(want):
        raise PipelineError(f"{tokenizer.name_or_path}: the chat template's text, tokenised, "
                            f"differs from apply_chat_template's ids for {text[:40]!r}")
    return prompt
