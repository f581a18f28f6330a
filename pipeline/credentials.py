"""No credential leaves the machine: find them in text about to be written or uploaded (the values
in use and the common shapes of tokens and keys), and strip them from URLs. Messages name where
a credential was found and what kind it is, never its value."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pipeline.core.bounded import gguf_reader
from pipeline.core.errors import InputError
from pipeline.core.safetensors_stream import header_bytes

# environment variables whose values are secrets, by name (HF_TOKEN, AWS_SECRET_ACCESS_KEY, …)
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|APIKEY|(^|_)KEY$", re.I)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") are settings, and would match everywhere
PATTERNS = {
    "a Hugging Face token (hf_…)": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "a URL with a password (scheme://user:password@host)":
        re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:[^\s/@]+@", re.I),
    "a private key block": re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"),
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a GitHub token": re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{36,}|github_pat_\w{40,})"),
    "a credential assignment (NAME_TOKEN=…, AWS_SECRET_ACCESS_KEY=…)":
        re.compile(r"\b[A-Z][A-Z0-9_]*(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY)[A-Z0-9_]*"
                   r"=(?=\S*[A-Za-z])[^\s'\"]{8,}"),
}
BINARY_SNIFF = 8192  # a NUL in the first bytes marks a binary file (weights, tokenizer.model)
USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#]*)@")  # RFC 3986


def strip_url(url: str) -> tuple[str, list[str]]:
    """(url without its user:password@ part, the credentials it held, raw and percent-decoded)."""
    m = USERINFO.match(url)
    if not m:
        return url, []
    creds = [v for c in m["userinfo"].split(":", 1) if c for v in dict.fromkeys((c, unquote(c)))]
    return m["scheme"] + url[m.end():], creds


def masked_url(url: str) -> str:
    """The URL as it may be shown: any user:password@ replaced by ***@."""
    return USERINFO.sub(r"\g<scheme>***@", url, count=1)


def secrets_in_use(*given: str | None) -> list[str]:
    """Values to look for: those given (the token, URL passwords) and every secret-named
    environment variable's (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, …), longest first."""
    env = [v for k, v in os.environ.items() if SECRET_ENV.search(k)]
    values = {v for v in (*given, *env) if v and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def secret_labels(*given: str | None) -> dict[str, str]:
    """Each secret in use (the values secrets_in_use finds, and huggingface_hub's stored login)
    mapped to what a message shows instead: `$NAME` for an environment variable's, else `***`."""
    from huggingface_hub import get_token

    names = {v: f"${k}" for k, v in sorted(os.environ.items()) if SECRET_ENV.search(k)}
    return {v: names.get(v, "***") for v in secrets_in_use(*given, get_token())}


def redact(text: str, labels: dict[str, str]) -> str:
    """`text` with every secret of `labels` (secret_labels) replaced by its label."""
    for value, label in labels.items():
        text = text.replace(value, label)
    return text


class RedactingStream:
    """A text stream (stdout, stderr) through which no secret of `labels` passes."""

    def __init__(self, stream: Any, labels: dict[str, str]) -> None:
        self.stream, self.labels = stream, labels

    def write(self, text: str) -> int:
        self.stream.write(redact(text, self.labels))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class RedactingFilter(logging.Filter):
    """A logging filter that replaces every secret of `labels` in a record's message."""

    def __init__(self, labels: dict[str, str]) -> None:
        super().__init__()
        self.labels = labels

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), self.labels), ()
        return True


def find_credentials(text: str, secrets: Iterable[str]) -> list[str]:
    """What credentials `text` holds, as "KIND (line N)", without their values."""
    found = [(text.index(s), "a secret in use here (a token or an environment variable's value)")
             for s in secrets if s in text]
    found += [(m.start(), kind) for kind, rx in PATTERNS.items() for m in [rx.search(text)] if m]
    return [f"{kind} (line {text.count(chr(10), 0, at) + 1})" for at, kind in sorted(found)]


def scanned_text(source: Path | bytes) -> str:
    """The text of a file to check: text files whole; binary files only where they carry text
    (a safetensors file's JSON header, a GGUF file's string metadata: free-form fields)."""
    if isinstance(source, bytes):
        return source.decode("utf-8", errors="replace")
    with open(source, "rb") as f:
        head = f.read(BINARY_SNIFF)
        if b"\0" not in head:
            return (head + f.read()).decode("utf-8", errors="replace")
        if source.suffix == ".gguf":
            return gguf_text(source)
        if source.suffix != ".safetensors":
            return ""
    return header_bytes(source)[0].decode("utf-8", errors="replace")


def gguf_text(path: Path) -> str:
    """A GGUF file's string metadata (name, chat template, ...), one value per line; the token
    list and merges are vocabulary, not free text."""
    from gguf import GGUFValueType

    fields = gguf_reader(path).fields.values()
    strings = []
    for f in fields:
        if f.name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            continue
        if f.types[-1:] == [GGUFValueType.STRING]:
            value = f.contents()
            strings += value if isinstance(value, list) else [value]
    return "\n".join(map(str, strings))


def refuse_credentials(files: dict[str, Path | bytes], secrets: Iterable[str]) -> None:
    """InputError naming each file (name -> path or bytes) that holds a credential; nothing about
    the credential itself is said."""
    secrets = list(secrets)
    problems = [f"{name}: {', '.join(kinds)}" for name, source in files.items()
                if (kinds := find_credentials(scanned_text(source), secrets))]
    if problems:
        raise InputError("refusing to write or upload files holding credentials; nothing was "
                         f"published: {'; '.join(problems)}. Remove them from the recipe, its "
                         "original card or the artifact (a card or file must never carry a token)")
