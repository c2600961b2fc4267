"""Atomic output (pocketseg.atomic).

* ``atomic_write_bytes``: the payload lands complete or not at all; a failure
  mid-write (fsync) or at the rename leaves neither the target nor a ``.part``
  temp file, and an existing target keeps its content; an existing file is only
  replaced with ``overwrite=True``; bad targets (folder, missing parent) are
  refused up front; the new file has the usual permissions (0666 & ~umask).
* ``atomic_output_dir``: the folder appears only when the ``with`` body
  succeeds; an exception leaves no target and no temp folder; an existing
  non-empty folder is refused without ``overwrite`` and, with it, replaced only
  after success (and kept intact when the body or the final swap fails).
* ``staged_files``: files that belong together appear together, in the order
  written, or (a full disk, an exception, a failed rename) none of them.
* ``try_lock``: a lock file is taken by one process at a time, records its
  owner, is taken over when its owner on this host is gone, never when it is
  on another host, and is removed only by its owner.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pocketseg.atomic
from pocketseg.atomic import atomic_output_dir, atomic_write_bytes, check_writable_target
from pocketseg.errors import OutputError


def temp_leftovers(folder: Path) -> list[str]:
    """Names the atomic helpers use for their temporaries: '.<name>.<random>.part' / '.old'."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".old")))


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- atomic_write_bytes


def test_write_bytes_creates_file_with_payload(tmp_path):
    payload = bytes(range(256)) * 1000
    target = atomic_write_bytes(tmp_path / "out.bin", payload)
    assert target == tmp_path / "out.bin"
    assert target.read_bytes() == payload
    assert temp_leftovers(tmp_path) == []


def test_write_bytes_accepts_memoryview(tmp_path):
    data = bytearray(b"abcdef")
    atomic_write_bytes(tmp_path / "out.bin", memoryview(data)[1:4])
    assert (tmp_path / "out.bin").read_bytes() == b"bcd"


def test_write_bytes_refuses_existing_without_overwrite(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists") as excinfo:
        atomic_write_bytes(target, b"new")
    assert excinfo.value.path == str(target)
    assert target.read_bytes() == b"old"
    atomic_write_bytes(target, b"new", overwrite=True)
    assert target.read_bytes() == b"new"
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_write_bytes_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, existing):
    target = tmp_path / "out.bin"
    if existing:
        target.write_bytes(b"old")
    seen = []

    def failing_fsync(fd):
        seen.append(os.fstat(fd).st_size)  # the partial file really exists at this point
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pocketseg.atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"x" * 5000, overwrite=True)
    assert seen == [5000]
    assert target.exists() == existing
    if existing:
        assert target.read_bytes() == b"old"
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_write_bytes_failure_at_rename_leaves_nothing(tmp_path, monkeypatch, existing):
    target = tmp_path / "out.bin"
    if existing:
        target.write_bytes(b"old")

    def failing_replace(src, dst):
        assert Path(src).read_bytes() == b"new payload"  # complete temp file beside the target
        assert Path(src).parent == tmp_path and Path(src).name.endswith(".part")
        raise KeyboardInterrupt  # even a BaseException cleans up

    monkeypatch.setattr(pocketseg.atomic.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new payload", overwrite=True)
    assert target.exists() == existing
    if existing:
        assert target.read_bytes() == b"old"
    assert temp_leftovers(tmp_path) == []


def test_write_bytes_target_appearing_during_write_is_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    real_fsync = os.fsync

    def racing_fsync(fd):
        real_fsync(fd)
        target.write_bytes(b"someone else's")

    monkeypatch.setattr(pocketseg.atomic.os, "fsync", racing_fsync)
    with pytest.raises(OutputError, match="appeared"):
        atomic_write_bytes(target, b"mine")
    assert target.read_bytes() == b"someone else's"
    assert temp_leftovers(tmp_path) == []


def test_write_bytes_refuses_folder_and_missing_parent(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        atomic_write_bytes(tmp_path / "adir", b"x", overwrite=True)
    with pytest.raises(OutputError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "out.bin", b"x")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists"):
        check_writable_target(tmp_path / "f.bin", overwrite=False)
    assert check_writable_target(tmp_path / "f.bin", overwrite=True) == tmp_path / "f.bin"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_write_bytes_file_mode_follows_umask(tmp_path, umask_027):
    target = atomic_write_bytes(tmp_path / "out.bin", b"x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask_027  # 0640, not mkstemp's 0600


# --------------------------------------------------------------------------- atomic_output_dir


def test_output_dir_appears_only_after_success(tmp_path):
    target = tmp_path / "results"
    with atomic_output_dir(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path and tmp.is_dir()
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
        assert not target.exists()  # nothing visible at the target while writing
    assert (target / "a.txt").read_text() == "a"
    assert (target / "sub" / "b.txt").read_text() == "b"
    assert not tmp.exists()
    assert temp_leftovers(tmp_path) == []


def test_output_dir_creates_missing_parents(tmp_path):
    target = tmp_path / "x" / "y" / "results"
    with atomic_output_dir(target) as tmp:
        (tmp / "a").write_text("a")
    assert (target / "a").read_text() == "a"


def test_output_dir_exception_leaves_no_target_and_no_temp(tmp_path):
    target = tmp_path / "results"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not target.exists()
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_output_dir_refuses_existing_non_empty_without_overwrite(tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    body_ran = False
    with pytest.raises(OutputError, match="non-empty") as excinfo:
        with atomic_output_dir(target):
            body_ran = True
    assert not body_ran  # refused before any work
    assert excinfo.value.path == str(target)
    assert (target / "keep.txt").read_text() == "keep"
    assert temp_leftovers(tmp_path) == []


def test_output_dir_refuses_a_file(tmp_path):
    target = tmp_path / "results"
    target.write_text("file")
    with pytest.raises(OutputError, match="not a folder"):
        with atomic_output_dir(target, overwrite=True):
            pass
    assert target.read_text() == "file"


def test_output_dir_existing_empty_folder_is_used(tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    with atomic_output_dir(target) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert temp_leftovers(tmp_path) == []


def test_output_dir_overwrite_replaces_only_after_success(tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # still the old results mid-way
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert temp_leftovers(tmp_path) == []


def test_output_dir_overwrite_keeps_old_results_on_failure(tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError("model crashed")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert temp_leftovers(tmp_path) == []


def test_output_dir_failed_final_swap_restores_old_results(tmp_path, monkeypatch):
    target = tmp_path / "results"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # 1: old results aside, 2: new results into place -> fails
            raise OSError(5, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(pocketseg.atomic.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert len(calls) == 3  # the third puts the old folder back
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert temp_leftovers(tmp_path) == []


def test_output_dir_target_appearing_during_work_is_not_replaced(tmp_path):
    target = tmp_path / "results"
    with pytest.raises(OutputError, match="appeared"):
        with atomic_output_dir(target) as tmp:
            (tmp / "mine.txt").write_text("mine")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert temp_leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_output_dir_mode_follows_umask(tmp_path, umask_027):
    with atomic_output_dir(tmp_path / "results") as tmp:
        (tmp / "a").write_text("a")
    assert stat.S_IMODE((tmp_path / "results").stat().st_mode) == 0o777 & ~umask_027  # not mkdtemp's 0700


def test_a_refusal_to_replace_names_the_flag_first(tmp_path):
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists \\(--overwrite replaces it; overwrite=True from Python\\)"):
        pocketseg.atomic.check_targets([target], overwrite=False)
    assert target.read_bytes() == b"mine"


# --------------------------------------------------------------------------- staged_files


def test_staged_files_publish_together_in_order(tmp_path, monkeypatch):
    order = []
    real_replace = os.replace
    monkeypatch.setattr(pocketseg.atomic.os, "replace", lambda src, dst: (order.append(Path(dst).name),
                                                                          real_replace(src, dst)))
    with pocketseg.atomic.staged_files() as staged:
        staged.write(tmp_path / "side.json", b"{}")
        staged.write(tmp_path / "main.bin", b"main")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []  # nothing yet
    assert order == ["side.json", "main.bin"]  # the file that marks the result finished comes last
    assert (tmp_path / "side.json").read_bytes() == b"{}" and (tmp_path / "main.bin").read_bytes() == b"main"
    assert temp_leftovers(tmp_path) == []


def test_staged_files_full_disk_leaves_nothing_and_names_the_file(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def full_on_main(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".main.bin."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(pocketseg.atomic.os, "fsync", full_on_main)
    with pytest.raises(OutputError) as excinfo:
        with pocketseg.atomic.staged_files() as staged:
            staged.write(tmp_path / "side.json", b"{}")
            staged.write(tmp_path / "main.bin", b"main")
    assert excinfo.value.path == str(tmp_path / "main.bin")
    assert "No space left on device" in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []  # neither file, no temporary


def test_staged_files_failed_rename_removes_what_it_published(tmp_path, monkeypatch):
    real_replace = os.replace

    def second_fails(src, dst):
        if Path(dst).name == "main.bin":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(pocketseg.atomic.os, "replace", second_fails)
    with pytest.raises(OutputError, match="main.bin: cannot be written: Input/output error"):
        with pocketseg.atomic.staged_files() as staged:
            staged.write(tmp_path / "side.json", b"{}")
            staged.write(tmp_path / "main.bin", b"main")
    assert list(tmp_path.iterdir()) == []


def test_staged_files_exception_in_body_discards(tmp_path):
    (tmp_path / "side.json").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with pocketseg.atomic.staged_files(overwrite=True) as staged:
            staged.write(tmp_path / "side.json", b"new")
            raise RuntimeError("crash before the last file")
    assert (tmp_path / "side.json").read_bytes() == b"old"
    assert temp_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- lock files


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has this pid now (reuse within the test is vanishingly unlikely)


def test_lock_is_exclusive_and_records_its_owner(tmp_path):
    path = tmp_path / "case.lock"
    lock = pocketseg.atomic.try_lock(path)
    assert isinstance(lock, pocketseg.atomic.FileLock)
    record = json.loads(path.read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert abs(record["started"] - time.time()) < 60
    other = pocketseg.atomic.try_lock(path)  # held by a live process (this one): not taken again
    assert isinstance(other, pocketseg.atomic.LockHolder) and other.pid == os.getpid() and not other.stale
    lock.release()
    assert not path.exists()
    assert temp_leftovers(tmp_path) == []


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "case.lock"
    dead = _dead_pid()
    path.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": time.time() - 10}))
    lock = pocketseg.atomic.try_lock(path)
    assert isinstance(lock, pocketseg.atomic.FileLock)
    assert lock.took_over is not None and lock.took_over.pid == dead
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    path = tmp_path / "case.lock"
    path.write_text(json.dumps({"pid": _dead_pid(), "host": "some-other-host.example", "started": time.time()}))
    holder = pocketseg.atomic.try_lock(path)
    assert isinstance(holder, pocketseg.atomic.LockHolder) and holder.host == "some-other-host.example"
    assert "some-other-host.example" in holder.describe() and str(path) in holder.describe()
    assert json.loads(path.read_text())["host"] == "some-other-host.example"


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    path = tmp_path / "case.lock"
    lock = pocketseg.atomic.try_lock(path)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0.0, "token": "theirs"}))
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"
