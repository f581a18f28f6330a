"""The package layering (DESIGN.md "Layers"): pipeline.core, the base, imports nothing of ours
above it; verify/ (judging) imports only the core and itself; the stages and the driver are above
both. verify/meta_reference.py, the independent Meta forward, imports none of our modules but the
errors; and no import cycle among our modules. Every import is read with `ast`, function-level and
importlib ones included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("pipeline", "verify")
# Lowest first: a module may import its own layer and those before it. A module's layer is the
# longest prefix of its name listed here ("pipeline" alone, its __init__, holds only __version__).
LAYERS = (("core", ("pipeline.core", "pipeline.__init__", "pipeline.__version__")),
          ("methods", ("pipeline.methods",)),
          ("verify", ("verify",)),
          ("stages", ("pipeline",)))
REFERENCE = "verify.meta_reference"
REFERENCE_MAY_IMPORT = frozenset({"pipeline.core.errors"})


def layer(name: str) -> int:
    """The index in LAYERS of a dotted module (or imported) name: its longest listed prefix."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if name == p or name.startswith(p + ".")), default=(0, len(LAYERS) - 1))
    return best[1]


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
        if name.split(".")[0] not in OURS:
            continue
        if name == "pipeline":  # `import pipeline`: the package, whose __init__ is the core's
            name = "pipeline.__init__"
        here, there = layer(module), layer(name)
        if there > here:
            out.append(f"{filename}:{line}: {module} imports {name} ({LAYERS[here][0]} is below "
                       f"{LAYERS[there][0]}: imports run one way, {' <- '.join(n for n, _ in LAYERS)})")
        elif (module == REFERENCE
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
    bad = "import torch\n\ndef f():\n    from pipeline.convert import ffn_dim\n    return ffn_dim\n"
    assert violations(bad, "pipeline.core.checkpoint", "pipeline/core/checkpoint.py") == [
        "pipeline/core/checkpoint.py:4: pipeline.core.checkpoint imports pipeline.convert.ffn_dim "
        "(core is below stages: imports run one way, core <- methods <- verify <- stages)"]
    for source in ("from verify.report import sha\n", "from ..job import Job\n",
                   "import importlib\nimportlib.import_module('pipeline.cli')\n",
                   "from pipeline.methods import METHODS\n"):
        assert len(violations(source, "pipeline.core.meta", "pipeline/core/meta.py")) == 1, source
    for source in ("import pipeline.job\n", "from pipeline import card\n",
                   "from pipeline.gguf import write_gguf\n"):
        assert len(violations(source, "verify.report", "verify/report.py")) == 1, source
    for source in ("from pipeline.core.llama import rms_norm\n", "from pipeline import __version__\n",
                   "from pipeline.methods import METHODS\n", "from . import metrics\n"):
        assert violations(source, "verify.stage", "verify/stage.py") == [], source
    assert violations("from pipeline.core.errors import InputError\nfrom pipeline.core import errors\n",
                      REFERENCE, "verify/meta_reference.py") == []
    for source in ("from pipeline.core.llama import rms_norm\n", "from . import metrics\n",
                   "import pipeline.core.meta\n"):
        found = violations(source, REFERENCE, "verify/meta_reference.py")
        assert len(found) == 1 and found[0].startswith("verify/meta_reference.py:1:"), source
    assert violations("from verify.stage import judge\nfrom pipeline.core.llama import rms_norm\n",
                      "pipeline.job", "pipeline/job.py") == []


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the modules of `sources` it imports (a name resolved to its longest prefix that
    is one of them, so `from pipeline.job import Job` is pipeline.job); a package's __init__ is
    the package."""
    names = {m.removesuffix(".__init__") for m in sources}
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        node = module.removesuffix(".__init__")
        graph[node] = set()
        for _, name in imported(ast.parse(source, module), module):
            parts = name.split(".")
            target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                           if ".".join(parts[:i]) in names), None)
            if target is not None and target != node:
                graph[node].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each import cycle a depth-first walk meets, as `a -> b -> a`."""
    found, state, path = [], {}, []

    def walk(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                walk(dep)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return found


def test_no_import_cycles():
    """Our modules import each other without a cycle (function-level imports included): a
    module's dependencies are below it, so each can be read, tested and replaced on its own."""
    found = cycles(import_graph({module: path.read_text() for module, path in modules()}))
    assert not found, "import cycles:\n" + "\n".join(found)


def test_cycle_check_finds_cycles():
    """The cycle check itself can fail: a function-level import back is a cycle, a package's
    __init__ importing nothing is not."""
    sources = {"pipeline.__init__": "",
               "pipeline.a": "from pipeline import b\n",
               "pipeline.b": "def f():\n    from pipeline.a import g\n",
               "pipeline.c": "import pipeline.d\nfrom pipeline import __version__\n",
               "pipeline.d": "from pipeline.e import x\n",
               "pipeline.e": "from pipeline.c import y\n"}
    assert cycles(import_graph(sources)) == ["pipeline.a -> pipeline.b -> pipeline.a",
                                             "pipeline.c -> pipeline.d -> pipeline.e -> pipeline.c"]
    del sources["pipeline.b"], sources["pipeline.e"]
    assert cycles(import_graph(sources)) == []


def test_only_pipeline_and_verify_are_installed_as_top_level_packages():
    """pyproject's package list, as setuptools resolves it: every package lies under `pipeline`
    or `verify` (no `core`, `tests` or `bench` lands in site-packages)."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = find_packages(str(ROOT), include=find["find"]["include"])
    assert {p.split(".")[0] for p in found} == {"pipeline", "verify"}
    assert {"pipeline.core", "pipeline.methods", "pipeline.recipe"} <= set(found)
