"""verify.json (schema 3) and its readable table, plus the sha256 of every artifact file, so that
publish can refuse an artifact changed since it was verified.

Publish trusts nothing a report says about itself: it re-reads the report strictly (shape and
types), recomputes the verdict from the checks against REQUIRED_CHECKS, re-hashes every file, and
matches the inputs verify recorded (a fingerprint of the fp16 files, the Meta files' sizes and md5)
against the artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import __version__
from pipeline.core.bounded import read_json
from pipeline.core.errors import CheckFailed, InputError
from pipeline.methods import DEFAULT_METHOD, METHODS, variant_method

SCHEMA = 3  # 2: artifacts record their relpath from the report; 3: GPTQ judged against RTN
REPORT_NAME = "verify.json"
TABLE_NAME = "verify.txt"
CHUNK = 1 << 24
# the checks an artifact of each kind must have passed to be published; a GPTQ-format variant's
# are its method's (pipeline/methods METHODS, by the artifact's `method`)
REQUIRED_CHECKS = {
    "fp16": ("conversion_parity", "perplexity", "generation"),
    "gptq": (),
    "gguf": ("gguf_metadata", "perplexity", "kl_divergence"),  # scored in llama.cpp
    "imatrix": (),  # the importance matrix the GGUF files were made with: proven through them
}
FILE_KINDS = ("gguf", "imatrix")  # artifacts that are one file, not a directory
GGUF_F16_CHECKS = ("gguf_parity",)  # also required of an F16 GGUF: its logits equal fp16's
IMATRIX_CHECKS = ("against_no_imatrix",)  # and of one made with an importance matrix
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Check:
    """One check of one artifact: what was judged, whether it passed, the numbers and the limits
    they were held to, and (where it failed) why."""

    check: str
    artifact: str
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    runtime: str | None = None  # a runtime check: the runtime that loaded the artifact
    reference: bool = False     # fp16's own generation: reported, never failing
    samples: list[dict[str, Any]] | None = None
    per_module: dict[str, dict[str, float]] | None = None

    @property
    def name(self) -> str:
        """`check:artifact` (`check:artifact@runtime`): how failures are named everywhere."""
        return f"{self.check}:{self.artifact}" + (f"@{self.runtime}" if self.runtime else "")

    def to_dict(self) -> dict[str, Any]:
        """verify.json's entry: optional fields only where set."""
        d: dict[str, Any] = {"check": self.check, "artifact": self.artifact}
        if self.runtime is not None:
            d["runtime"] = self.runtime
        d["passed"] = self.passed
        if self.reference:
            d["reference"] = True
        if self.reason is not None:
            d["reason"] = self.reason
        d.update(metrics=self.metrics, thresholds=self.thresholds)
        if self.samples is not None:
            d["samples"] = self.samples
        if self.per_module is not None:
            d["per_module"] = self.per_module
        return d


@dataclass
class Report:
    """verify.json: what was verified (eval text, artifacts with their file hashes, inputs), every
    check, the perplexities and the runtime results. One (de)serialisation: to_dict/from_dict."""

    passed: bool
    device: str
    dtype: str
    eval: dict[str, Any]
    artifacts: dict[str, dict[str, Any]]
    checks: list[Check]
    perplexity: dict[str, float]
    tokens_per_second: float
    runtimes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    inputs: dict[str, Any] | None = None
    schema: int = SCHEMA
    tool_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "tool_version": self.tool_version, "passed": self.passed,
                "device": self.device, "dtype": self.dtype, "eval": self.eval,
                "artifacts": self.artifacts, "checks": [c.to_dict() for c in self.checks],
                "perplexity": self.perplexity, "runtimes": self.runtimes,
                "tokens_per_second": self.tokens_per_second, "inputs": self.inputs}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: Path | str) -> Report:
        """A report from its JSON object, checked against REPORT_SCHEMA first (InputError naming
        `where` and the first problems)."""
        if d.get("schema") != SCHEMA:
            raise InputError(f"{where}: not a schema-{SCHEMA} verify report")
        problems = shape_problems(d)
        if problems:
            raise InputError(f"{where}: malformed verify report ({'; '.join(problems[:5])}); "
                             "run verify again")
        known = {f.name for f in fields(Check)}
        return cls(passed=d["passed"], device=d["device"], dtype=d["dtype"], eval=d["eval"],
                   artifacts=d["artifacts"], perplexity=d["perplexity"],
                   checks=[Check(**{k: v for k, v in c.items() if k in known}) for c in d["checks"]],
                   tokens_per_second=d["tokens_per_second"], runtimes=d.get("runtimes") or {},
                   inputs=d.get("inputs"), schema=d["schema"],
                   tool_version=str(d.get("tool_version", "")))

    def failed(self) -> list[str]:
        """Each failed check's name (Check.name), in order."""
        return [c.name for c in self.checks if not c.passed]

    def metrics(self, check: str) -> dict[str, dict[str, Any]]:
        """artifact -> metrics of every `check` entry (e.g. kl_divergence per variant)."""
        return {c.artifact: c.metrics for c in self.checks if c.check == check}


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def artifact_files(root: Path, progress: bool = False) -> dict[str, str]:
    """sha256 of every file under root, keyed by its POSIX path relative to root (a file
    artifact, a GGUF: by its name)."""
    root = Path(root)
    if root.is_file():
        return {root.name: sha256_file(root)}
    files = sorted(p for p in root.rglob("*") if p.is_file())
    bar = tqdm(files, desc=f"sha256 {root.name}", unit="file", file=sys.stderr,
               disable=not progress, leave=False)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in bar}


def artifact_entry(root: Path, quantization: dict[str, Any] | None,
                   progress: bool = False) -> dict[str, Any]:
    """One `artifacts` entry: path, kind, GPTQ parameters and method when quantised, file
    hashes."""
    root = Path(root).resolve()
    entry: dict[str, Any] = {"path": str(root), "kind": "fp16"}
    if quantization:
        method = variant_method(root)
        entry.update({"kind": METHODS[method].format,  # the format the method wrote
                      **{k: quantization.get(k) for k in ("bits", "group_size", "desc_act")},
                      "method": method})
    entry["files"] = artifact_files(root, progress)
    return entry


def write_report(report: Report, out: Path) -> None:
    """verify.json and verify.txt into directory out."""
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out / TABLE_NAME).write_text(render(report))


def read_report(path: Path | str) -> Report:
    """A verify.json (or the directory holding it), schema-checked, its artifacts' paths where
    they lie now (relocated: a work directory moved whole still finds them)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    if not (path.exists() or path.is_symlink()):
        raise InputError(f"{path}: verify report missing (run the verify stage first)")
    try:
        d = read_json(path)
    except InputError as e:
        raise InputError(f"{e}; run verify again") from None
    report = Report.from_dict(d, path)
    report.artifacts = relocated(report.artifacts, path)
    return report


# verify.json's schema, as data: what publish, the cards and verify.txt read, with its types.
# A dict is an object ("key?" optional, other keys allowed), MapOf/ListOf a container, a tuple of
# types a value (bool is never an int here); NUM a number, and OPT_* the same or null.
NUM, OPT_NUM, OPT_STR, SCALAR = (int, float), (int, float, type(None)), (str, type(None)), \
    (str, int, float, bool, type(None))


@dataclass(frozen=True)
class MapOf:
    """An object with any keys, each value of the spec `item`."""

    item: Any


@dataclass(frozen=True)
class ListOf:
    """A list, each item of the spec `item`."""

    item: Any


SAMPLE = {"prompt": (str,), "text": (str,), "agree?": (int,), "compared?": (int,)}
RUNTIME_RESULT = {"version": OPT_STR, "checked": (bool,), "reason": OPT_STR, "loaded": (bool,),
                  "error": OPT_STR, "expected_refusal?": (bool,), "ppl": OPT_NUM,
                  "ppl_ours": OPT_NUM, "ratio": OPT_NUM, "kl_mean": OPT_NUM, "top1": OPT_NUM,
                  "kernels": ListOf((str,))}
REPORT_SCHEMA = {
    "passed": (bool,), "device": (str,), "dtype": (str,), "tokens_per_second": NUM,
    "eval": {"source": (str,), "files": ListOf((str,)), "seqlen": (int,), "windows": (int,),
             "tokens": (int,)},
    "artifacts": MapOf({"path": (str,), "relpath?": (str,), "kind": (str,), "files": MapOf((str,)),
                        "bits?": OPT_NUM, "group_size?": OPT_NUM, "desc_act?": (bool, type(None)),
                        "type?": (str,), "runtime?": (str,), "method?": (str,),
                        "imatrix?": MapOf(SCALAR)}),
    "checks": ListOf({"check": (str,), "artifact": (str,), "passed": (bool,), "runtime?": (str,),
                      "reason?": (str,), "metrics?": MapOf(SCALAR), "thresholds?": MapOf(SCALAR),
                      "reference?": (bool,), "samples?": ListOf(SAMPLE),
                      "per_module?": MapOf(MapOf(NUM))}),
    "perplexity": MapOf(NUM),
    "runtimes?": MapOf(MapOf(RUNTIME_RESULT)),
}
# the metrics the tables format as numbers, by check
NUMERIC_METRICS = {"kl_divergence": ("kl_mean", "kl_p99", "top1"),
                   "conversion_parity": ("max_rel_err",), "perplexity": ("ppl",)}


def schema_problems(value: Any, spec: Any, where: str) -> list[str]:
    """Where `value` departs from `spec` (REPORT_SCHEMA's language), as `key.path: expected`."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{where}: must be an object"]
        out = []
        for key, sub in spec.items():
            name = key.rstrip("?")
            if name in value:
                out += schema_problems(value[name], sub, f"{where}.{name}")
            elif not key.endswith("?"):
                out.append(f"{where}.{name}: missing")
        return out
    if isinstance(spec, (MapOf, ListOf)):
        kind = dict if isinstance(spec, MapOf) else list
        if not isinstance(value, kind):
            return [f"{where}: must be {'an object' if kind is dict else 'a list'}"]
        items = value.items() if kind is dict else enumerate(value)
        return [p for k, v in items for p in schema_problems(v, spec.item, f"{where}.{k}")]
    if isinstance(value, bool) and bool not in spec or not isinstance(value, spec):
        return [f"{where}: must be {' or '.join(t.__name__ for t in spec)}, got {type(value).__name__}"]
    return []


def shape_problems(report: dict[str, Any]) -> list[str]:
    """What in a report departs from REPORT_SCHEMA, or from the rules types cannot say: artifact
    kinds, relative file paths with sha256 hashes, numeric table metrics."""
    problems = schema_problems(report, REPORT_SCHEMA, "verify")
    if problems:
        return problems
    for name, a in report["artifacts"].items():
        if a["kind"] not in REQUIRED_CHECKS:
            problems.append(f"artifacts.{name}.kind: one of {'/'.join(REQUIRED_CHECKS)}")
        if a.get("method", DEFAULT_METHOD) not in METHODS:
            problems.append(f"artifacts.{name}.method: one of {'/'.join(METHODS)}")
        for rel, sha in a["files"].items():
            parts = rel.split("/")
            if rel.startswith("/") or ".." in parts or "" in parts or "\0" in rel:
                problems.append(f"artifacts.{name}.files: {rel!r} is not a relative path")
            elif not SHA256.match(sha):
                problems.append(f"artifacts.{name}.files.{rel}: not a sha256")
    for i, c in enumerate(report["checks"]):
        for key in NUMERIC_METRICS.get(c["check"], ()):
            value = c.get("metrics", {}).get(key)
            if value is not None and not (isinstance(value, NUM) and not isinstance(value, bool)):
                problems.append(f"checks.{i}.metrics.{key}: must be a number")
    return problems


def required_checks(entry: dict[str, Any]) -> tuple[str, ...]:
    """The checks an artifact entry must have passed: its kind's, a variant's method's, an F16
    GGUF's parity, and a GGUF made with an importance matrix its gate against the file without."""
    required = REQUIRED_CHECKS[entry["kind"]]
    if entry["kind"] == "gptq":
        required += METHODS[entry.get("method", DEFAULT_METHOD)].checks
    if entry["kind"] == "gguf" and entry.get("type") == "F16":
        required += GGUF_F16_CHECKS
    if entry["kind"] == "gguf" and entry.get("imatrix"):
        required += IMATRIX_CHECKS
    return required


def verdict_problems(report: Report, names: list[str], from_meta: bool = True) -> list[str]:
    """Why the report does not prove the artifacts `names` publishable, recomputed from its checks
    (never from its `passed`): each must be present with every required check (required_checks;
    an fp16 model not converted `from_meta` here, an HF source, has no Meta checkpoint to match),
    and every check must have passed."""
    problems = [] if report.checks else ["its check list is empty"]
    failed = report.failed()
    if failed:
        problems.append(f"check(s) failed: {', '.join(failed)}"
                        + (" although it says passed" if report.passed else ""))
    for name in names:
        entry = report.artifacts.get(name)
        if entry is None:
            problems.append(f"artifact {name!r} is missing")
            continue
        done = {c.check for c in report.checks if c.artifact == name}
        required = required_checks(entry)
        if entry["kind"] == "fp16" and not from_meta:
            required = tuple(c for c in required if c != "conversion_parity")
        missing = [c for c in required if c not in done]
        if missing:
            problems.append(f"{name!r} lacks the required check(s) {', '.join(missing)}")
    return problems


def check_verdict(report: Report, names: list[str], path: Path,
                  from_meta: bool = True) -> None:
    """CheckFailed (naming the report) unless its own checks prove every artifact in `names`."""
    problems = verdict_problems(report, names, from_meta)
    if problems:
        raise CheckFailed(f"{path}: does not prove the artifacts publishable ({'; '.join(problems)});"
                          " nothing is published: run verify again on these artifacts")


def hashes_digest(files: dict[str, str]) -> str:
    """One sha256 of an artifact's file sha256s (path -> hash, sorted by path): the identity of
    its contents, as recorded in verify.json's inputs."""
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def source_identity(meta: Path | None) -> dict[str, Any] | None:
    """The Meta checkpoint verify compared against: every top-level file's size and md5 (the
    hashes checklist.chk and conversion.json use)."""
    if meta is None:
        return None
    meta = Path(meta).resolve()
    files = sorted(p for p in meta.iterdir() if p.is_file())
    bar = tqdm(files, desc=f"md5 {meta.name}", unit="file", file=sys.stderr, leave=False)
    return {"path": str(meta), "files": {p.name: {"bytes": p.stat().st_size,
                                                  "md5": file_digest(p, "md5")} for p in bar}}


def run_inputs(artifacts: dict[str, Any], meta: Path | None, eval_sha256: str) -> dict[str, Any]:
    """What verify ran on, by hash: the fp16 files' fingerprint, the Meta source, the eval text."""
    return {"fp16": hashes_digest(artifacts["fp16"]["files"]), "meta": source_identity(meta),
            "eval_sha256": eval_sha256}


def check_inputs(report: Report, path: Path, conversion: dict[str, Any] | None,
                 from_meta: bool = True) -> None:
    """CheckFailed unless the report's recorded inputs belong to its fp16 artifact: the fp16
    fingerprint matches its file hashes, and, for an fp16 model converted `from_meta` here, the
    Meta files verify hashed are those it was converted from (`conversion`: its conversion.json,
    itself one of the verified files)."""
    inputs = report.inputs
    if not isinstance(inputs, dict):
        raise CheckFailed(f"{path}: records no inputs (made by an older verify, or edited); "
                          "run verify again")
    if inputs.get("fp16") != hashes_digest(report.artifacts["fp16"]["files"]):
        raise CheckFailed(f"{path}: inputs.fp16 does not match the report's own fp16 file hashes "
                          "(edited?); run verify again")
    if not from_meta:
        return
    meta = inputs.get("meta")
    verified = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(verified, dict):
        raise CheckFailed(f"{path}: verify ran without the Meta checkpoint (inputs.meta); "
                          "publishing the fp16 model needs conversion parity against it")
    try:
        converted = conversion["source"]["files"]
        pairs = [(name, f["bytes"], f["md5"], verified.get(name)) for name, f in converted.items()]
    except (KeyError, TypeError, AttributeError):
        raise CheckFailed(f"{path}: the fp16 artifact's conversion.json lists no source files; "
                          "convert and verify again") from None
    wrong = [name for name, size, md5, v in pairs
             if not isinstance(v, dict) or v.get("bytes") != size or (md5 and v.get("md5") != md5)]
    if wrong or not pairs:
        raise CheckFailed(f"{path}: verify compared against a Meta checkpoint other than the one "
                          f"the fp16 model was converted from (differs: {', '.join(wrong) or 'no files'}); "
                          "run verify again with the right --meta")


def with_relpaths(artifacts: dict[str, dict[str, Any]], out: Path) -> dict[str, dict[str, Any]]:
    """Each artifact entry also records its path relative to the report's directory `out`, so
    that a work directory moved as a whole (`mv`) still finds its artifacts (artifact_paths)."""
    base = Path(out).resolve()
    return {n: {**a, "relpath": os.path.relpath(a["path"], base)} for n, a in artifacts.items()}


def relocated(artifacts: dict[str, dict[str, Any]], path: Path) -> dict[str, dict[str, Any]]:
    """The artifacts of the report read from `path` (its verify.json), each at the path where it
    lies now: at its relpath from the report when something is there (a work directory moved
    whole), else as recorded. What the artifact holds is still judged by its file hashes."""
    base = Path(path).resolve()
    base = base if base.is_dir() else base.parent
    moved_to = {}
    for name, a in artifacts.items():
        moved = base / a["relpath"] if "relpath" in a else None
        here = moved is not None and (moved.exists() or moved.is_symlink())
        moved_to[name] = {**a, "path": str(moved.resolve()) if here else a["path"]}
    return moved_to


def check_integrity(report: Report | Path | str, artifact_name: str) -> None:
    """Raise CheckFailed unless the artifact's files are exactly those hashed in the report."""
    if not isinstance(report, Report):
        report = read_report(report)
    entry = report.artifacts.get(artifact_name)
    if entry is None:
        raise CheckFailed(f"artifact {artifact_name!r} is not in the verify report "
                          f"(verified: {', '.join(report.artifacts)})")
    root = Path(entry["path"])
    if not (root.is_file() if entry.get("kind") in FILE_KINDS else root.is_dir()):
        raise CheckFailed(f"{root}: artifact {artifact_name!r} is missing")
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


def _columns(rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def runtime_table(section: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """verify.json's `runtimes` (runtime -> variant -> result) as text lines, one row a result."""
    if not section:
        return []
    rows = [("runtime", "variant", "loaded", "ppl", "ours", "ratio - 1", "KL mean", "top-1",
             "kernels")]
    for rt, results in section.items():
        for name, r in results.items():
            version = f"{rt} {r['version']}" if r["version"] else rt
            if not r["checked"]:
                rows.append((version, name, r["reason"], "", "", "", "", "", ""))
                continue
            loaded = "yes" if r["loaded"] and not r["error"] else \
                ("refused (expected) " if r.get("expected_refusal") else "FAILED ") + r["error"]
            num = {k: "-" if r[k] is None else f"{r[k]:.6g}" for k in ("ppl", "ppl_ours", "kl_mean")}
            rows.append((version, name, loaded[:80], num["ppl"], num["ppl_ours"],
                         "-" if r["ratio"] is None else f"{r['ratio']:+.2e}", num["kl_mean"],
                         "-" if r["top1"] is None else f"{r['top1']:.2%}", ", ".join(r["kernels"])))
    return ["", "runtimes: each GPTQ variant loaded in each runtime's own loader and kernels, "
                "perplexity against ours on the same windows"] + _columns(rows, "  ")


def perplexity_rows(report: Report) -> list[dict[str, Any]]:
    """One row per artifact with a perplexity, in the report's `perplexity` order: its kind and
    grid, its perplexity and ratio to fp16's, its RTN baseline's (`NAME:rtn`, when measured), and
    its KL mean / p99 and top-1 agreement against fp16. The one source of every perplexity table
    (verify.txt, the job summary, the cards)."""
    ppl = report.perplexity
    kl = report.metrics("kl_divergence")
    base = ppl.get("fp16")
    rows = []
    for name in (n for n in ppl if not n.endswith(":rtn")):
        art = report.artifacts.get(name, {})
        rtn, m = ppl.get(f"{name}:rtn"), kl.get(name, {})
        rows.append({"artifact": name, "kind": art.get("kind"),
                     "bits": art.get("bits", 16 if name == "fp16" else None),
                     "group_size": art.get("group_size"), "act_order": art.get("desc_act"),
                     "ppl": ppl[name], "ratio": ppl[name] / base if base else None,
                     "ppl_rtn": rtn, "ratio_rtn": rtn / base if rtn and base else None,
                     "kl_mean": m.get("kl_mean"), "kl_p99": m.get("kl_p99"), "top1": m.get("top1")})
    return rows


NONE = "—"  # a cell with no value (fp16 against itself, a GPTQ grid field of a GGUF file)


def perplexity_cells(row: dict[str, Any]) -> dict[str, str]:
    """A perplexity row's cells as every table shows them: perplexity to 4 decimals, its change
    against fp16 in percent, KL in nats to 3 significant digits (not fixed decimals: an 8-bit
    variant's KL can be ~1e-6), top-1 as a percentage; NONE where there is no value."""
    def num(v: Any, spec: str) -> str:
        return NONE if v is None else format(v, spec)

    def change(ratio: float | None) -> str:
        return NONE if ratio is None else f"{(ratio - 1) * 100:+.2f}%"

    return {"artifact": row["artifact"], "bits": num(row["bits"], ""),
            "group": num(row["group_size"], ""), "act_order": num(row["act_order"], ""),
            "ppl": f"{row['ppl']:.4f}",
            "vs_fp16": NONE if row["artifact"] == "fp16" else change(row["ratio"]),
            "ppl_rtn": num(row["ppl_rtn"], ".4f"), "rtn_vs_fp16": change(row["ratio_rtn"]),
            "kl_mean": num(row["kl_mean"], ".3g"), "kl_p99": num(row["kl_p99"], ".3g"),
            "top1": num(row["top1"], ".2%")}


# The perplexity table of verify.txt and the job summary: (header, perplexity_cells key).
PERPLEXITY_COLUMNS = (("artifact", "artifact"), ("bits", "bits"), ("group", "group"),
                      ("act-order", "act_order"), ("perplexity", "ppl"), ("vs fp16", "vs_fp16"),
                      ("RTN perplexity", "ppl_rtn"), ("RTN vs fp16", "rtn_vs_fp16"),
                      ("KL mean", "kl_mean"), ("KL p99", "kl_p99"), ("top-1", "top1"))


def perplexity_table(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The header, then each row's cells in PERPLEXITY_COLUMNS order."""
    cells = [perplexity_cells(r) for r in rows]
    return [tuple(h for h, _ in PERPLEXITY_COLUMNS)] + \
        [tuple(c[k] for _, k in PERPLEXITY_COLUMNS) for c in cells]


def render_perplexity(rows: list[dict[str, Any]]) -> str:
    """perplexity_table as markdown (the job summary)."""
    table = perplexity_table(rows)
    lines = [table[0], ("---",) * len(table[0]), *table[1:]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def render(report: Report) -> str:
    """The report as plain text: the checks, perplexities, KL and top-1 against fp16, the worst
    module of each variant, and the generation samples of every artifact side by side."""
    rows = [("check", "artifact", "result", "metrics", "thresholds")]
    for c in report.checks:
        metrics = _pairs(c.metrics) + (f" ({c.reason})" if c.reason else "")
        check = c.check + (f" in {c.runtime}" if c.runtime else "")
        rows.append((check, c.artifact, "PASS" if c.passed else "FAIL", metrics,
                     _pairs(c.thresholds)))
    lines = [f"verify: {'PASSED' if report.passed else 'FAILED'}  "
             f"(device {report.device}, {report.dtype}, "
             f"{report.tokens_per_second:.1f} tokens/s)", ""]
    lines += _columns(rows)
    ev = report.eval
    lines += ["", f"perplexity ({ev['source']}: {len(ev['files'])} files, {ev['windows']} windows "
                  f"× {ev['seqlen']} tokens)"]
    lines += ["  KL (nats) and top-1 (same top token) against fp16, at every evaluation position"]
    lines += _columns(perplexity_table(perplexity_rows(report)), "  ")
    lines += runtime_table(report.runtimes)
    modules = {c.artifact: c for c in report.checks if c.check == "module_integrity"}
    if modules:
        lines += ["", "module integrity: the worst module's ||W - W_q|| / ||W|| and output error "
                      "||(W - W_q)X|| / ||WX|| on evaluation activations, as ratios to "
                      "round-to-nearest's on the same grid"]
        rows = [("artifact", "worst module", "ratio", "allowed", "worst by output", "output ratio",
                 "allowed")]
        for n, c in modules.items():
            m, t = c.metrics, c.thresholds
            rows.append((n, str(m.get("worst_module", "-")), _fmt(m.get("ratio", "-")),
                         _fmt(t.get("module_error", "-")), str(m.get("worst_output_module", "-")),
                         _fmt(m.get("output_ratio", "-")), _fmt(t.get("module_output_error", "-"))))
        lines += _columns(rows, "  ")
    gen = {c.artifact: c.samples or [] for c in report.checks if c.check == "generation"}
    if gen:
        lines += ["", "generation: greedy samples beside fp16's (agree: tokens equal to fp16's "
                      "before the first difference)"]
        prompts = [s["prompt"] for s in next(iter(gen.values()))]
        for i, prompt in enumerate(prompts):
            lines.append(f"  {prompt!r}")
            rows = []
            for n, samples in gen.items():
                s = samples[i]
                agree = f"agree {s['agree']}/{s['compared']}" if "agree" in s else "reference"
                flag = f"[degenerate: {s['degenerate']}]" if s.get("degenerate") else ""
                rows.append((n, agree, repr(s["text"]), flag))
            lines += _columns(rows, "    ")
    return "\n".join(lines) + "\n"
