"""The job's work directory (default work/<recipe name>/): where each stage's output lies, one
source for the job, which writes them, and publish, which reads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.recipe import Recipe
from verify.report import REPORT_NAME, TABLE_NAME

ROOT = Path("work")  # the default work directories' folder, relative to where the job runs


def plain(name: str) -> str:
    """`name` when it is one plain file name (the recipe checks branches and the model name; this
    keeps anything derived from them inside the work directory)."""
    if name in ("", ".", "..") or Path(name).name != name or "\0" in name:
        raise InputError(f"{name!r}: not a plain file name, so it cannot name an output in the "
                         "work directory")
    return name


@dataclass(frozen=True)
class WorkDir:
    """fp16/, gptq/<branch>/, gguf/<model name>.<TYPE>.gguf (and its .imatrix.gguf), verify/
    (verify.json, verify.txt),
    publish-plan/ and, with --executor slurm, slurm/ under `path`."""

    path: Path
    model: str  # [model] name: names the GGUF files
    source: Path | None = None  # an HF source: the fp16 model every stage reads, never written

    @classmethod
    def of(cls, recipe: Recipe, path: Path | None = None) -> WorkDir:
        """The recipe's work directory: `path`, or work/<recipe name> when None."""
        return cls(Path(path) if path is not None else ROOT / recipe.name, recipe.model.name)

    @property
    def fp16(self) -> Path:
        return self.source if self.source is not None else self.path / "fp16"

    @property
    def downloads(self) -> Path:
        """huggingface_hub's cache for an HF source named by repository."""
        return self.path / "hub-cache"

    def gptq(self, branch: str) -> Path:
        return self.path / "gptq" / plain(branch)

    def gguf(self, type_name: str) -> Path:
        from pipeline.core.gguf_types import file_name  # the gguf library is slow to import

        return self.path / "gguf" / plain(file_name(self.model, type_name))

    @property
    def imatrix(self) -> Path:
        """The importance matrix the quantised GGUF files are made with (<model>.imatrix.gguf)."""
        return self.gguf("imatrix")

    @property
    def verify(self) -> Path:
        return self.path / "verify"

    @property
    def report(self) -> Path:
        return self.verify / REPORT_NAME

    @property
    def table(self) -> Path:
        return self.verify / TABLE_NAME

    @property
    def plan(self) -> Path:
        return self.path / "publish-plan"

    @property
    def slurm(self) -> Path:
        """submitit's job files and logs."""
        return self.path / "slurm"

    def artifacts(self, recipe: Recipe, branches: tuple[str, ...]) -> dict[str, Any]:
        """What publish takes from the work directory (publish's keyword arguments)."""
        return {"fp16": self.fp16, "variants": {b: self.gptq(b) for b in branches},
                "ggufs": {g.type: self.gguf(g.type) for g in recipe.gguf},
                "report": self.report}
