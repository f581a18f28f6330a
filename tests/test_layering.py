"""The package layering (DESIGN.md "Layers"): verify/ is the lower layer and never imports
pipeline/; verify/meta_reference.py, the independent Meta forward, imports none of our modules but
verify.errors. Every import is read with `ast`, function-level and importlib ones included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("pipeline", "verify")
REFERENCE = "verify.meta_reference"
REFERENCE_MAY_IMPORT = frozenset({"verify.errors"})


def imported(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every module `module`'s source imports: `import a.b`, `from a
    import b` (as a.b too, b may be a module), relative imports resolved, and importlib /
    __import__ calls with a literal name."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from . import x` in verify/y.py is verify.x
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = ".".join(x for x in (parent, base) if x)
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                             "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(source: str, module: str, filename: str) -> list[str]:
    """`file:line: module imports name (why)` for each import that breaks the layering."""
    out = []
    for line, name in imported(ast.parse(source, filename), module):
        top = name.split(".")[0]
        if module.startswith("verify.") and top == "pipeline":
            out.append(f"{filename}:{line}: {module} imports {name} (verify/ is the lower layer: "
                       "it never imports pipeline/)")
        elif (module == REFERENCE and top in OURS
              and not any(name == m or name.startswith(m + ".") for m in REFERENCE_MAY_IMPORT)):
            out.append(f"{filename}:{line}: {module} imports {name} (the Meta reference shares "
                       f"nothing with the converter; only {sorted(REFERENCE_MAY_IMPORT)})")
    return out


def modules() -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(ROOT).with_suffix("").parts), p)
            for pkg in OURS for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_layers_hold():
    found = [v for module, path in modules()
             for v in violations(path.read_text(), module, str(path.relative_to(ROOT)))]
    assert not found, "\n".join(found)


def test_checker_finds_bad_imports():
    """The checker itself can fail: synthetic sources with each kind of bad import."""
    bad = "import torch\n\ndef f():\n    from pipeline.meta import ffn_dim\n    return ffn_dim\n"
    assert violations(bad, "verify.checkpoint", "verify/checkpoint.py") == [
        "verify/checkpoint.py:4: verify.checkpoint imports pipeline.meta.ffn_dim (verify/ is the "
        "lower layer: it never imports pipeline/)"]
    for source in ("import pipeline\n", "from ..pipeline import job\n",
                   "import importlib\nimportlib.import_module('pipeline.cli')\n"):
        assert len(violations(source, "verify.report", "verify/report.py")) == 1, source
    assert violations("from verify.errors import InputError\nfrom verify import errors\n",
                      REFERENCE, "verify/meta_reference.py") == []
    for source in ("from verify.llama import rms_norm\n", "from . import llama\n",
                   "import pipeline.meta\n"):
        found = violations(source, REFERENCE, "verify/meta_reference.py")
        assert len(found) == 1 and found[0].startswith("verify/meta_reference.py:1:"), source
    assert violations("from verify.llama import rms_norm\n", "pipeline.convert",
                      "pipeline/convert.py") == []
