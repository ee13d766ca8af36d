"""shoal.core.files: files in shared directories are created without following links, whole or not at all.

Every test plants what another user of a shared directory could: a symlink at the predictable name, pointing
at a file outside that must stay untouched.
"""

from __future__ import annotations

import os
import stat

import pytest

from shoal.core.files import atomic_write, create_new, fsync_directory, open_replacing


@pytest.fixture
def planted(tmp_path):
    """``(shared directory, a victim file outside it)``; ``shared/name`` may be made a link to the victim."""
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    return shared, victim


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_a_planted_link_and_leaves_its_target(planted):
    shared, victim = planted
    link = shared / "report.json"
    link.symlink_to(victim)
    with atomic_write(link, "w") as f:
        f.write("new")
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "new"
    assert sorted(os.listdir(shared)) == ["report.json"]  # no temporary file left
    assert _mode(link) == 0o666 & ~_umask()  # what open() would give, not mkstemp's 0o600


def test_atomic_write_that_raises_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "index.json"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(path, "wb") as f:
            f.write(b"half of the new")
            1 / 0
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["index.json"]


def test_atomic_write_onto_a_directory_fails_and_leaves_nothing(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        with atomic_write(tmp_path / "taken", "w", durable=False) as f:
            f.write("x")
    assert os.listdir(tmp_path) == ["taken"]


def test_open_replacing_shows_the_new_file_at_once_and_leaves_the_links_target(planted):
    shared, victim = planted
    link = shared / "trace.rank0.json"
    link.symlink_to(victim)
    f = open_replacing(link, "w")
    try:
        assert not link.is_symlink() and link.read_text() == ""  # already in place, before any write
        f.write("[")
        f.flush()
        assert link.read_text() == "["
    finally:
        f.close()
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(shared)) == ["trace.rank0.json"]


@pytest.mark.parametrize("dangling", [False, True])
def test_create_new_refuses_a_planted_link(planted, dangling):
    shared, victim = planted
    link = shared / "2026-01-02-bench.json"
    link.symlink_to(victim.parent / "nothing-yet" if dangling else victim)
    with pytest.raises(FileExistsError):
        create_new(link, "w")
    assert victim.read_text() == "precious"
    assert not (victim.parent / "nothing-yet").exists()
    with create_new(shared / "free.json", "wb") as f:
        f.write(b"{}")
    assert (shared / "free.json").read_bytes() == b"{}"
    with pytest.raises(FileExistsError):
        create_new(shared / "free.json")


def test_bad_mode_and_fsync_directory(tmp_path):
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        create_new(tmp_path / "x", "a")
    fsync_directory(tmp_path)
