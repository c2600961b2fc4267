"""Files, in one place: folders, atomic writes, JSON and text (and reading JSON back), lock files.

Every file is written to a temporary file beside the target and renamed over
it, so a crash or an exception mid-write never leaves a partial file at the
target path, and an existing file is only replaced when the caller asked for
it. Every folder the package creates goes through :func:`ensure_dir`, every
JSON file through :func:`write_json`, so they fail the same way: one
:class:`~pocketseg.errors.OutputError` naming the path (a full disk included:
"No space left on device").

Files that belong together (a label map and its statistics and preview) are
staged with :func:`staged_files`: each is written to a temporary file beside its
target, and only when all of them are written are they renamed into place, the
last one given last, so a failure leaves none of them (and no temporary file).

:func:`try_lock` takes a lock file atomically (``O_CREAT | O_EXCL``) that records
its owner (pid, host, start time); a lock whose owner was a process on this host
that is gone is taken over, one on another host never is (its processes cannot be
seen from here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketseg.errors import InputError, OutputError

try:
    import fcntl
except ImportError:  # not on Windows: stale locks are then never taken over automatically
    fcntl = None  # type: ignore[assignment]


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


def ensure_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``path`` (and its parents) unless it is a folder already; ``what`` names it in the error."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, f"exists and is not a folder (expected the {what})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(folder, f"cannot create the {what} ({exc.strerror or exc})") from None
    return folder


def check_targets(paths: Iterable[str | os.PathLike], *, overwrite: bool) -> None:
    """Refuse, before any work, to replace existing output files unless ``overwrite``."""
    for path in map(Path, paths):
        if path.is_dir():
            raise OutputError(path, "is a folder, expected a file path")
        if path.exists() and not overwrite:
            raise OutputError(path, "already exists (--overwrite replaces it; overwrite=True from Python)")


def check_writable_target(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Validate an output path before any work is done; returns it as a Path."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(target, "is a directory, expected a file path")
    if target.exists() and not overwrite:
        raise OutputError(target, "already exists (--overwrite replaces it; overwrite=True from Python)")
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


def _write_failed(target: Path, exc: OSError) -> OutputError:
    """What the operating system refused while writing ``target`` (a full disk, a quota, an I/O error), as
    one error naming the file; errors of the package itself pass unchanged."""
    if isinstance(exc, OutputError):
        return exc
    return OutputError(target, f"cannot be written: {exc.strerror or exc}")


def _write_temporary(target: Path, payload: bytes | memoryview) -> str:
    """``payload`` in a new temporary file beside ``target`` (flushed and fsynced); its name.

    Nothing is left behind when this fails."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; outputs get the usual 0666 & ~umask
            chmod_like_new(fd, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return tmp_name


def atomic_write_bytes(path: str | os.PathLike, payload: bytes | memoryview, *, overwrite: bool = False) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file + fsync + rename).

    Raises:
        OutputError: the target exists (without ``overwrite``) or cannot be written (naming the file and the
            operating system's reason, e.g. "No space left on device"); no temporary file is left.
    """
    target = check_writable_target(path, overwrite=overwrite)
    try:
        tmp_name = _write_temporary(target, payload)
    except OSError as exc:
        raise _write_failed(target, exc) from None
    try:
        if not overwrite and target.exists():  # appeared while we were writing
            raise OutputError(target, "appeared while writing; not replacing it")
        os.replace(tmp_name, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise _write_failed(target, exc) from None
        raise
    return target


class StagedFiles:
    """Files written to temporary names beside their targets, renamed into place together (see
    :func:`staged_files`)."""

    def __init__(self, *, overwrite: bool = False):
        self.overwrite = overwrite
        self._staged: list[tuple[Path, str]] = []

    @property
    def targets(self) -> list[Path]:
        return [target for target, _ in self._staged]

    def write(self, path: str | os.PathLike, payload: bytes | memoryview) -> Path:
        """Stage ``payload`` for ``path`` (written and fsynced now, published by :meth:`publish`)."""
        target = check_writable_target(path, overwrite=self.overwrite)
        if target in self.targets:
            raise ValueError(f"{target} is staged twice")
        try:
            self._staged.append((target, _write_temporary(target, payload)))
        except OSError as exc:
            raise _write_failed(target, exc) from None
        return target

    def write_text(self, path: str | os.PathLike, text: str) -> Path:
        return self.write(path, text.encode("utf-8"))

    def discard(self) -> None:
        """Remove every staged temporary file; no target is touched."""
        for _, tmp_name in self._staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        self._staged.clear()

    def publish(self) -> list[Path]:
        """Rename the staged files over their targets in the order they were staged; the targets.

        Every target is checked before the first rename (one that appeared meanwhile is not replaced without
        ``overwrite``). Should a rename fail, the files this call created are removed again, so a failure
        leaves none of the new files (replaced ones stay replaced: their earlier content is gone either way).
        """
        staged, self._staged = self._staged, []
        published: list[Path] = []
        current = staged[0][0] if staged else Path(".")
        try:
            if not self.overwrite:
                for target, _ in staged:
                    if target.exists():
                        raise OutputError(target, "appeared while writing; not replacing it")
            for current, tmp_name in staged:
                existed = current.exists()
                os.replace(tmp_name, current)
                if not existed:
                    published.append(current)
        except BaseException as exc:
            for target in published:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
            for _, tmp_name in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
            if isinstance(exc, OSError):
                raise _write_failed(current, exc) from None
            raise
        return [target for target, _ in staged]


@contextlib.contextmanager
def staged_files(*, overwrite: bool = False) -> Iterator[StagedFiles]:
    """Write several files all-or-nothing: each ``staged.write(path, payload)`` goes to a temporary file beside
    ``path``; when the ``with`` body ends without an exception they are renamed into place in the order
    written (so the file that marks a result finished is staged last); on an exception, a full disk
    included, every temporary file is removed and no target is touched.

    A process killed while the files are renamed can still leave the earlier ones without the last one: the
    window is that of a few renames in one folder, not that of computing and writing them.
    """
    staged = StagedFiles(overwrite=overwrite)
    try:
        yield staged
    except BaseException:
        staged.discard()
        raise
    staged.publish()


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
        raise OutputError(target, "is a non-empty folder (--overwrite replaces it; overwrite=True from Python)")
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


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) atomically, creating the parent folder."""
    target = Path(path)
    ensure_dir(target.parent)
    return atomic_write_bytes(target, text.encode("utf-8"), overwrite=overwrite)


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # NumPy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_text(data: Any, *, indent: int | None = 1, allow_nan: bool = False) -> str:
    """The package's JSON: paths and NumPy values converted, one final newline; NaN and infinity refused
    (a ValueError) unless ``allow_nan``, for records where a NaN is itself the finding (a diverged loss)."""
    return json.dumps(data, indent=indent, allow_nan=allow_nan, default=_json_default) + "\n"


def write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = False, indent: int | None = 1,
               allow_nan: bool = False) -> Path:
    """Write ``data`` as JSON atomically (see :func:`json_text`), creating the parent folder."""
    return write_text(path, json_text(data, indent=indent, allow_nan=allow_nan), overwrite=overwrite)


def read_json(path: str | os.PathLike, *, missing: str = "does not exist") -> Any:
    """The JSON document at ``path``; one :class:`~pocketseg.errors.InputError` naming the file when it is
    missing (with ``missing`` as the problem) or not valid JSON."""
    source = Path(path)
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(source, missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(source, f"is not valid JSON ({exc})") from None
    except OSError as exc:  # unreadable: permissions, a folder, an I/O error
        raise InputError(source, f"cannot be read ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------------------------------- lock files

@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock file, as the file says (None where it does not say, or cannot be read)."""

    path: Path
    pid: int | None = None
    host: str | None = None
    started: float | None = None

    def describe(self) -> str:
        if self.pid is None:
            return f"lock file {self.path} (owner unreadable)"
        since = "" if self.started is None else time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}{since}, lock file {self.path}"

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    @property
    def stale(self) -> bool:
        """The owner was a process on this host that is gone (or whose pid now belongs to a newer process).
        An owner on another host is never judged stale: its processes cannot be seen from here."""
        if self.pid is None or not self.on_this_host:
            return False
        if self.pid <= 0:
            return True
        try:
            os.kill(self.pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by another user
            pass
        started = _process_start_time(self.pid)
        # A process that started after the lock was taken cannot have taken it: the pid was reused.
        return started is not None and self.started is not None and started > self.started + 2.0


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc tells (Linux); else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, counted after the command name
        with open("/proc/stat", encoding="ascii") as proc_stat:
            boot = next(float(line.split()[1]) for line in proc_stat if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def read_lock(path: str | os.PathLike) -> LockHolder:
    """The holder a lock file names (fields None where the file is unreadable or not a lock)."""
    lock_path = Path(path)
    try:
        record = json.loads(lock_path.read_text(encoding="utf-8"))
        return LockHolder(lock_path, int(record["pid"]), str(record["host"]), float(record["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return LockHolder(lock_path)


class FileLock:
    """A lock file this process holds; :meth:`release` (or leaving the ``with`` block) removes it."""

    def __init__(self, path: Path, token: str, took_over: LockHolder | None = None):
        self.path = path
        self._token = token
        #: The stale holder whose lock this one replaced, if any.
        self.took_over = took_over

    def held(self) -> bool:
        """Whether the file is still this lock (not removed, not taken over)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8")).get("token") == self._token
        except (OSError, ValueError, AttributeError):
            return False

    def release(self) -> None:
        if self.held():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create_lock(path: Path) -> FileLock | None:
    """Create the lock file, complete with its record, only if it does not exist; None if it does."""
    token = uuid.uuid4().hex
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": token}
    # The record is written under a temporary name and hard-linked to the lock's name: the link is atomic
    # and fails where the name exists, and the lock never exists without its record. Where the file system
    # has no hard links, an exclusive create and a write (a crash in between leaves an unreadable lock).
    tmp_name = _write_temporary(path, json_text(record).encode("utf-8"))
    try:
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return None
        except OSError:  # no hard links here
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json_text(record))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return FileLock(path, token)


def _break_stale(path: Path, holder: LockHolder) -> bool:
    """Remove a stale lock file, unless another process is doing so or has done so already; True if removed.

    Breakers of one lock are processes of one host (only there is the lock judged stale); they serialise on
    an advisory lock of the stale file itself and check that the name still points at that file, so no
    breaker removes a lock another one has just taken.
    """
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process is breaking it
            return False
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return True
        if not same_file or read_lock(path) != holder:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def try_lock(path: str | os.PathLike) -> FileLock | LockHolder:
    """Take the lock file ``path`` atomically: the :class:`FileLock` when this process got it, else the
    :class:`LockHolder` that has it. A lock left by a process of this host that is gone is taken over
    (logged by the caller); one held by another host is not.
    """
    lock_path = Path(path)
    broken = None
    try:
        for _ in range(3):
            lock = _create_lock(lock_path)
            if lock is not None:
                lock.took_over = broken
                return lock
            holder = read_lock(lock_path)
            if not holder.stale or not _break_stale(lock_path, holder):
                return holder
            broken = holder
    except OSError as exc:
        raise _write_failed(lock_path, exc) from None
    return read_lock(lock_path)
