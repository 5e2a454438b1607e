"""Atomic writes: a failure part-way leaves the old file and no temporary behind."""
from __future__ import annotations

import json

import pytest

from visattn._io import atomic_path, atomic_write_json, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text('{"old": true}')
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})  # not serialisable: fails before any rename
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_text('{"half": ')
        raise OSError(28, "No space left on device")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_creates_parents_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "a" / "b" / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp != target
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    assert atomic_write_text(tmp_path / "t.md", "x").read_text() == "x"


def test_new_file_gets_the_usual_mode_and_an_old_file_keeps_its_own(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        assert (atomic_write_text(tmp_path / "new.md", "x").stat().st_mode & 0o777) == 0o644
        old = tmp_path / "old.md"
        old.write_text("old")
        old.chmod(0o640)
        assert (atomic_write_text(old, "new").stat().st_mode & 0o777) == 0o640
    finally:
        os.umask(umask)
