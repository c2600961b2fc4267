"""Atomic file output: write to a temporary file beside the target, then rename.

A crash or an exception mid-write therefore never leaves a partial file at the
target path, and an existing file is only replaced when the caller asked for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pocketseg.errors import OutputError


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # portable fallback: read by setting, then restore
    os.umask(mask)
    return mask


def chmod_like_new(path: str | os.PathLike | int, base: int) -> None:
    """Give a temporary file (0600) or folder (0700) the mode a plain open()/mkdir() would have."""
    mode = base & ~_umask()
    with contextlib.suppress(NotImplementedError, OSError):
        if isinstance(path, int):
            os.fchmod(path, mode)
        else:
            os.chmod(path, mode)


def check_writable_target(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Validate an output path before any work is done; returns it as a Path."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(target, "is a directory, expected a file path")
    if target.exists() and not overwrite:
        raise OutputError(target, "already exists (pass overwrite=True / --overwrite to replace it)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(target, f"parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(target, f"parent folder {parent} is not writable")
    return target


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator:
    """A binary handle on a temporary file beside ``path``; flushed, fsynced and renamed over it on success.

    For writers that stream (torch.save, np.save). The file is owner-only, as tempfile makes it.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_bytes(path: str | os.PathLike, payload: bytes | memoryview, *, overwrite: bool = False) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file + fsync + rename)."""
    target = check_writable_target(path, overwrite=overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; outputs get the usual 0666 & ~umask
            chmod_like_new(fd, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if not overwrite and target.exists():  # appeared while we were writing
            raise OutputError(target, "appeared while writing; not replacing it")
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return target


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``.

    On an exception the temporary folder is removed and ``path`` is untouched.
    With ``overwrite`` an existing folder is replaced only after the new one is complete.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(target, "exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(target, "is a non-empty folder (pass overwrite=True / --overwrite to replace it)")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(target, f"cannot create parent folder: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(target, f"parent folder {parent} is not writable")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=parent))
    chmod_like_new(tmp, 0o777)  # mkdtemp makes 0700 folders; outputs get the usual 0777 & ~umask
    try:
        yield tmp
        if not overwrite and (target.is_file() or (target.is_dir() and any(target.iterdir()))):
            raise OutputError(target, "appeared while writing; not replacing it")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            old.rmdir()
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the previous output back before reporting the failure
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
