"""No credential leaves the machine: find them in text about to be written or uploaded (the values
in use and the common shapes of tokens and keys), and strip them from URLs. Messages name where
a credential was found and what kind it is, never its value."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

from verify.errors import InputError

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
MAX_HEADER = 100 << 20  # a safetensors JSON header larger than this is not read (corrupt)
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
        if source.suffix != ".safetensors" or len(head) < 8:
            return ""
        (n,) = struct.unpack("<Q", head[:8])
        f.seek(8)
        return f.read(min(n, MAX_HEADER)).decode("utf-8", errors="replace")


def gguf_text(path: Path) -> str:
    """A GGUF file's string metadata (name, chat template, ...), one value per line; the token
    list and merges are vocabulary, not free text."""
    from gguf import GGUFReader, GGUFValueType

    try:
        fields = GGUFReader(path).fields.values()
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable GGUF file ({e})") from None
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
