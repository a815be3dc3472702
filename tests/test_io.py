"""``datamodules.io.atomic_write``: complete files or the old ones, never a torn file or a leftover temporary."""

from __future__ import annotations

import os
import stat

import pytest

from datamodules.io import TMP_MARK, atomic_write


def test_bytes_text_and_callable_writers(tmp_path):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "b.txt", "héllo\n")
    atomic_write(tmp_path / "c.txt", lambda p: p.write_text("from a writer"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "c.txt").read_text() == "from a writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.txt"]  # no temporaries left


def test_replaces_an_existing_file_through_a_temporary_in_the_same_folder(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old")
    seen = []

    def writer(p):
        seen.append(p)
        assert target.read_text() == "old"  # the target is untouched until the rename
        p.write_text("new")

    atomic_write(target, writer)
    assert target.read_text() == "new"
    assert seen[0].parent == tmp_path
    assert TMP_MARK in seen[0].name
    assert not seen[0].exists()


@pytest.mark.parametrize("fail_after_writing", [True, False])
def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path, fail_after_writing):
    target = tmp_path / "t.parquet"
    target.write_text("complete old contents")

    def broken(p):
        if fail_after_writing:
            p.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, broken)
    assert target.read_text() == "complete old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not create"):
        atomic_write(tmp_path / "x", lambda p: None)
    assert not list(tmp_path.iterdir())


def test_permissions_follow_the_umask_like_a_plain_write(tmp_path):
    (tmp_path / "plain").write_text("x")
    atomic_write(tmp_path / "atomic", "x")
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_latest_metrics_file_orders_steps_numerically(tmp_path):
    from datamodules.io import latest_metrics_file

    assert latest_metrics_file(tmp_path) is None
    for name in ("step200.json", "step1000.json", "step00000900.json", "test.json"):
        (tmp_path / name).write_text("{}")
    assert latest_metrics_file(tmp_path).name == "step1000.json"  # not "step200" (lexicographic last)
