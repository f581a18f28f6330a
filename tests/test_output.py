"""Atomic outputs: nothing half-written looks complete, nothing existing is replaced without force."""

import pytest

from pipeline.errors import OutputExistsError
from pipeline.output import partial_path, staged_dir


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        (tmp / "f").write_text("x")
        assert not target.exists()
    assert (target / "f").read_text() == "x"
    assert not partial_path(target).exists()


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(target) as tmp:
            (tmp / "f").write_text("x")
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_keep_on_error_leaves_partial_for_resume(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(target, keep_on_error=True) as tmp:
            (tmp / "layer0").write_text("done")
            raise RuntimeError("disk full")
    assert not target.exists()
    assert (partial_path(target) / "layer0").read_text() == "done"
    with staged_dir(target, keep_on_error=True) as tmp:
        assert (tmp / "layer0").read_text() == "done"
    assert (target / "layer0").exists()


def test_existing_output_needs_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with staged_dir(target):
            pass
    assert (target / "old").exists()
    with staged_dir(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
