"""verify.json (schema 1) and its readable table, plus the sha256 of every artifact file, so that
publish can refuse an artifact changed since it was verified."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.errors import CheckFailed, InputError

SCHEMA = 1
REPORT_NAME = "verify.json"
TABLE_NAME = "verify.txt"
CHUNK = 1 << 24


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def artifact_files(root: Path, progress: bool = False) -> dict[str, str]:
    """sha256 of every file under root, keyed by its POSIX path relative to root."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    bar = tqdm(files, desc=f"sha256 {root.name}", unit="file", file=sys.stderr,
               disable=not progress, leave=False)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in bar}


def artifact_entry(root: Path, quantization: dict[str, Any] | None,
                   progress: bool = False) -> dict[str, Any]:
    """One `artifacts` entry: path, kind, GPTQ parameters when quantised, file hashes."""
    root = Path(root).resolve()
    entry: dict[str, Any] = {"path": str(root), "kind": "gptq" if quantization else "fp16"}
    if quantization:
        entry.update({k: quantization.get(k) for k in ("bits", "group_size", "desc_act")})
    entry["files"] = artifact_files(root, progress)
    return entry


def write_report(report: dict[str, Any], out: Path) -> None:
    """verify.json and verify.txt into directory out."""
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (out / TABLE_NAME).write_text(render(report))


def read_report(path: Path | str) -> dict[str, Any]:
    """A verify.json (or the directory holding it), schema-checked."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    if not path.is_file():
        raise InputError(f"{path}: verify report missing (run the verify stage first)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise InputError(f"{path}: not a schema-{SCHEMA} verify report")
    for key in ("passed", "artifacts", "checks"):
        if key not in report:
            raise InputError(f"{path}: verify report has no {key!r}")
    return report


def check_integrity(report: dict[str, Any] | Path | str, artifact_name: str) -> None:
    """Raise CheckFailed unless the artifact's files are exactly those hashed in the report."""
    if not isinstance(report, dict):
        report = read_report(report)
    entry = report["artifacts"].get(artifact_name)
    if entry is None:
        raise CheckFailed(f"artifact {artifact_name!r} is not in the verify report "
                          f"(verified: {', '.join(report['artifacts'])})")
    root = Path(entry["path"])
    if not root.is_dir():
        raise CheckFailed(f"{root}: artifact {artifact_name!r} directory is missing")
    now = artifact_files(root)
    recorded = entry["files"]
    problems = [f"{f}: changed" for f in sorted(recorded) if f in now and now[f] != recorded[f]]
    problems += [f"{f}: missing" for f in sorted(set(recorded) - set(now))]
    problems += [f"{f}: not verified (new file)" for f in sorted(set(now) - set(recorded))]
    if problems:
        raise CheckFailed(f"{root}: artifact {artifact_name!r} no longer matches its verify "
                          f"report; run verify again ({'; '.join(problems)})")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _pairs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in d.items())


def render(report: dict[str, Any]) -> str:
    """The report as a plain-text table: checks, perplexities, generation samples."""
    rows = [("check", "artifact", "result", "metrics", "thresholds")]
    for c in report["checks"]:
        metrics = _pairs(c.get("metrics", {})) + (f" ({c['reason']})" if c.get("reason") else "")
        rows.append((c["check"], c["artifact"], "PASS" if c["passed"] else "FAIL", metrics,
                     _pairs(c.get("thresholds", {}))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"verify: {'PASSED' if report['passed'] else 'FAILED'}  "
             f"(device {report['device']}, {report['dtype']}, "
             f"{report['tokens_per_second']:.1f} tokens/s)", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    ev = report["eval"]
    lines += ["", f"perplexity ({ev['source']}: {len(ev['files'])} files, {ev['windows']} windows "
                  f"× {ev['seqlen']} tokens)"]
    base = report["perplexity"].get("fp16")
    for name, ppl in report["perplexity"].items():
        delta = f"  ({(ppl / base - 1) * 100:+.2f}% vs fp16)" if base and name != "fp16" else ""
        lines.append(f"  {name:<40} {ppl:10.4f}{delta}")
    for c in report["checks"]:
        if c["check"] != "generation":
            continue
        lines += ["", f"generation samples: {c['artifact']}"]
        for s in c["samples"]:
            flag = f"  [degenerate: {s['degenerate']}]" if s.get("degenerate") else ""
            lines.append(f"  {s['prompt']!r} -> {s['text']!r}{flag}")
    return "\n".join(lines) + "\n"
