"""The one atomic-write helper: the old file or the new one, never half of one, and no temporary files left."""

import stat

import pytest

from mmap_deploy.atomic import atomic_path


def test_success_replaces_the_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "result.json"
    out.write_text("old")
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".result.json.") and tmp.name.endswith(".tmp")
        assert tmp.exists() and out.read_text() == "old"  # nothing visible until the block ends
        tmp.write_text("new")
    assert out.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # shared, not mkstemp's private 0o600


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("failed half-way")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "a[1].npy"  # glob characters in the name are taken literally
    (tmp_path / ".a[1].npy.k3x9_q.tmp").write_bytes(b"left by a killed run")
    (tmp_path / ".b.npy.zz.tmp").write_bytes(b"another file's")
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.npy.zz.tmp", "a[1].npy"]


def test_nested_paths_commit_together_or_not_at_all(tmp_path):
    """Two files that must appear together (e.g. a model pair) commit only when both blocks succeed."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    with pytest.raises(ValueError):
        with atomic_path(a) as ta, atomic_path(b) as tb:
            ta.write_text("a")
            tb.write_text("b")
            raise ValueError("the pair fails its check")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(a) as ta, atomic_path(b) as tb:
        ta.write_text("a")
        tb.write_text("b")
    assert a.read_text() == "a" and b.read_text() == "b" and len(list(tmp_path.iterdir())) == 2
