"""Atomic, safe outputs: nothing half-written looks complete, nothing existing is replaced without
force, nothing that is not this tool's output or that is an input is ever replaced, and links are
never followed."""

import os

import pytest

from pipeline.core.errors import InputError, OutputExistsError
from pipeline.core.output import check_target, partial_path, staged_dir, staged_file

MANIFEST = "made.json"  # what the stage under test always writes


def tree(root):
    """Every path under root with its bytes (None for directories), links as their target."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            out[rel] = ("link", os.readlink(p)) if os.path.islink(p) else \
                None if os.path.isdir(p) else open(p, "rb").read()
    return out


def build(target, force=False, **kw):
    with staged_dir(target, force, manifest=MANIFEST, **kw) as tmp:
        (tmp / MANIFEST).write_text("{}")
        (tmp / "new").write_text("new")


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target, manifest=MANIFEST) as tmp:
        assert tmp != target and tmp.parent == target.parent
        (tmp / "f").write_text("x")
        assert not target.exists()
    assert (target / "f").read_text() == "x"
    assert not partial_path(target).exists()


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(target, manifest=MANIFEST) as tmp:
            (tmp / "f").write_text("x")
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_keep_on_error_leaves_partial_for_resume(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(target, keep_on_error=True, manifest=MANIFEST) as tmp:
            (tmp / "layer0").write_text("done")
            raise RuntimeError("disk full")
    assert not target.exists()
    assert (partial_path(target) / "layer0").read_text() == "done"
    with staged_dir(target, keep_on_error=True, manifest=MANIFEST) as tmp:
        assert (tmp / "layer0").read_text() == "done"
    assert (target / "layer0").exists()


def test_existing_output_needs_force_and_must_be_ours(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        build(target)
    with pytest.raises(OutputExistsError, match=r"not an output of this tool \(no made.json\)"):
        build(target, force=True)
    assert tree(target) == {"old": b"old"}
    (target / MANIFEST).write_text("{}")  # now it is ours
    build(target, force=True)
    assert tree(target) == {MANIFEST: b"{}", "new": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_an_empty_directory_but_never_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    build(tmp_path / "empty", force=True)
    assert (tmp_path / "empty" / "new").is_file()
    (tmp_path / "file").write_text("precious")
    with pytest.raises(OutputExistsError, match="not an output of this tool"):
        build(tmp_path / "file", force=True)
    assert (tmp_path / "file").read_text() == "precious"


@pytest.mark.parametrize("layout, how", [
    ("same", "is"), ("output_inside_input", "lies inside"), ("input_inside_output", "contains"),
    ("via_symlink", "is"), ("partial_is_input", "is")])
def test_output_never_overlaps_an_input(tmp_path, layout, how):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / MANIFEST).write_text("{}")  # even an output of ours that is an input is refused
    (src / "sub" / "weights").write_bytes(b"\x00\x01")
    (tmp_path / "link").symlink_to(src)
    target = {"same": src, "output_inside_input": src / "out", "input_inside_output": tmp_path,
              "via_symlink": tmp_path / "link" / "sub" / ".." / ".." / "src",
              "partial_is_input": tmp_path / "x"}[layout]
    inputs = [tmp_path / ".x.partial"] if layout == "partial_is_input" else [src]
    if layout == "partial_is_input":
        inputs[0].mkdir()
    before = tree(tmp_path)
    with pytest.raises(InputError, match=f"the output {how} the input {inputs[0]}"):
        build(target, force=True, inputs=inputs)
    assert tree(tmp_path) == before


def test_target_that_is_a_symlink_is_never_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / MANIFEST).write_text("{}")
    (tmp_path / "live").symlink_to(elsewhere)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = tree(tmp_path)
    for name in ("live", "dangling"):
        with pytest.raises(InputError, match=f"{name}: is a symbolic link"):
            build(tmp_path / name, force=True)
    assert tree(tmp_path) == before and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("kind", ["link_to_dir", "dangling_link", "file"])
def test_partial_name_taken_by_a_link_or_file(tmp_path, kind):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    partial = partial_path(tmp_path / "out")
    if kind == "link_to_dir":
        partial.symlink_to(victim)
    elif kind == "dangling_link":
        partial.symlink_to(tmp_path / "nowhere")
    else:
        partial.write_text("a file")
    before = tree(tmp_path)
    for keep in (False, True):
        with pytest.raises(InputError, match=r"\.out\.partial: the temporary name of .* is taken"):
            build(tmp_path / "out", force=True, keep_on_error=keep)
    assert tree(tmp_path) == before


def test_unwritable_locations_are_clear_errors(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InputError, match=r"a-file/out: cannot create it: .*a-file is not a dir"):
        build(tmp_path / "a-file" / "out")
    # /proc/self is read-only for every user, root included (procfs)
    with pytest.raises(InputError, match=r"/proc/self/new/out: cannot create it: /proc/self is "
                                         r"not writable"):
        check_target("/proc/self/new/out", True, manifest=MANIFEST)
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.mark.parametrize("layout, how", [("same", "is"), ("output_inside_input", "lies inside"),
                                         ("partial_is_input", "is")])
def test_staged_file_never_overlaps_an_input(tmp_path, layout, how):
    """staged_file refuses what staged_dir refuses (one check_target): the target and its partial
    path alike; a partial path that is an input would otherwise be deleted before the write."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.gguf").write_bytes(b"GGUF old")
    target = {"same": src / "model.gguf", "output_inside_input": src / "new.gguf",
              "partial_is_input": tmp_path / "x.gguf"}[layout]
    source = src / "model.gguf" if layout == "same" else src
    if layout == "partial_is_input":
        source = partial_path(target)
        source.write_bytes(b"an input")
    before = tree(tmp_path)
    with pytest.raises(InputError, match=f"the output {how} the input {source}"):
        with staged_file(target, force=True, magic=b"GGUF", inputs=[source]) as tmp:
            tmp.write_bytes(b"GGUF new")
    assert tree(tmp_path) == before


def test_staged_file_replaces_only_its_own_format(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--force"):
        with staged_file(target, magic=b"GGUF"):
            pass
    with pytest.raises(OutputExistsError, match=r"not an output of this tool \(not a b'GGUF' file\)"):
        with staged_file(target, force=True, magic=b"GGUF"):
            pass
    target.write_bytes(b"GGUF old")
    with staged_file(target, force=True, magic=b"GGUF") as tmp:
        assert tmp == partial_path(target)
        tmp.write_bytes(b"GGUF new")
    assert tree(tmp_path) == {"m.gguf": b"GGUF new"}
