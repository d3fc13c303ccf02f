"""Nothing a user had is lost or changed by a writer: atomic files and folders (``mlxllm.files``) under
failures at every step, predictable temporary names that belong to the user, and symlinked targets;
then the same through ``mlxllm convert``."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest

from mlxllm import files
from mlxllm.files import replacing_dir, write_atomic
from test_cli import assert_one_line_error, run
from test_convert import source  # noqa: F401  (fixture: a small bf16 checkpoint with a tokenizer)


def _tree(root):
    """Every path below ``root`` with its content (files) or None (folders, links' targets aside)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[rel] = open(p, "rb").read()
            else:
                out[rel] = None
    return out


def _fail_at(monkeypatch, call: int):
    """Make the ``call``-th ``os.replace`` inside mlxllm.files raise, as a crash there would."""
    real, seen = os.replace, []

    def replace(a, b):
        seen.append((a, b))
        if len(seen) == call:
            raise OSError("simulated crash")
        return real(a, b)

    monkeypatch.setattr(files.os, "replace", replace)
    return seen


def test_write_atomic_kinds_and_failures(tmp_path):
    p = tmp_path / "x.json"
    write_atomic(p, "text")
    assert p.read_text() == "text"
    write_atomic(p, b"bytes")
    assert p.read_bytes() == b"bytes"
    write_atomic(p, lambda q: q.write_text("callable"))
    assert p.read_text() == "callable"
    with pytest.raises(ZeroDivisionError):
        write_atomic(p, lambda q: (q.write_text("half"), 1 / 0))
    assert p.read_text() == "callable" and sorted(os.listdir(tmp_path)) == ["x.json"]


def test_write_atomic_crash_at_rename_keeps_old(tmp_path, monkeypatch):
    p = tmp_path / "state.json"
    p.write_text("old")
    _fail_at(monkeypatch, 1)
    with pytest.raises(OSError, match="simulated"):
        write_atomic(p, "new")
    assert p.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["state.json"]


def test_write_atomic_through_symlink_keeps_link(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def _make(folder, marker):
    folder.mkdir()
    (folder / "weights").write_text(marker)


def test_replacing_dir_new_and_replaced(tmp_path):
    out = tmp_path / "out"
    with replacing_dir(out) as tmp:
        (tmp / "weights").write_text("one")
    assert (out / "weights").read_text() == "one"
    with replacing_dir(out) as tmp:
        (tmp / "weights").write_text("two")
    assert _tree(tmp_path) == {"out": None, "out/weights": b"two"}


@pytest.mark.parametrize("crash", ["in the block", "renaming the old aside", "renaming the new in"])
def test_replacing_dir_crash_at_each_step_keeps_old(tmp_path, monkeypatch, crash):
    out = tmp_path / "out"
    _make(out, "old")
    user = tmp_path / "out.tmp"  # a user's folder with the name a careless writer would pick
    _make(user, "mine")
    before = _tree(tmp_path)
    if crash != "in the block":
        _fail_at(monkeypatch, 1 if crash == "renaming the old aside" else 2)
    with pytest.raises((OSError, RuntimeError)):
        with replacing_dir(out) as tmp:
            (tmp / "weights").write_text("new")
            if crash == "in the block":
                raise RuntimeError("simulated failure while writing")
    assert _tree(tmp_path) == before


def test_replacing_dir_symlinked_target(tmp_path):
    real = tmp_path / "models" / "real"
    real.parent.mkdir()
    _make(real, "old")
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    with replacing_dir(link) as tmp:
        (tmp / "weights").write_text("new")
    assert link.is_symlink() and (link / "weights").read_text() == "new"
    assert sorted(os.listdir(real.parent)) == ["real"]  # no temporary or old copy left beside it


def test_convert_keeps_what_the_user_had(source, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "new"
    user = tmp_path / "new.tmp"
    _make(user, "mine")
    code, _, err = run(["convert", "-m", str(source), "-o", str(out)], capsys, monkeypatch)
    assert code in (0, None), err
    assert (user / "weights").read_text() == "mine"  # an unrelated new.tmp is never touched
    first = _tree(out)

    # --force with a failure while writing the new copy: the old output stays whole, nothing is left over
    before = _tree(tmp_path)
    monkeypatch.setattr(mx, "save_safetensors", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    code, _, err = run(["convert", "-m", str(source), "-o", str(out), "--force"], capsys, monkeypatch)
    assert code not in (0, None) and "disk full" in err
    assert _tree(tmp_path) == before
    monkeypatch.undo()

    # --force onto a symlinked --out replaces the folder the link names and keeps the link
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    code, _, err = run(["convert", "-m", str(source), "-o", str(link), "--force"], capsys, monkeypatch)
    assert code in (0, None), err
    assert link.is_symlink() and _tree(out) == first
    assert sorted(os.listdir(tmp_path)) == ["link", "new", "new.tmp"]

    # without --force an existing output is refused and untouched
    code, _, err = run(["convert", "-m", str(source), "-o", str(out)], capsys, monkeypatch)
    assert_one_line_error(code, err, "exists")
    assert _tree(out) == first
