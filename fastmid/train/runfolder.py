"""What keeps a run folder whole: one live run per folder, and writes that a crash cannot tear.

**One live run per folder** (:func:`acquire_run_lock`): an exclusive ``flock`` on
``<run>/.lock``. ``flock`` belongs to the open file, so the operating system drops it when the holder exits for any
reason (``kill -9``, a crash, power loss with a local disk): a crashed run never blocks the next
one and there is no stale-lock logic to get wrong. The file stays in the folder between runs; what
it holds (``{"pid", "started", "host", "argv"}``, JSON) is only for the message a second run
prints, never for deciding whether the folder is free.

Notes for callers:

* Take the lock before anything reads or changes the folder (``--overwrite``, resume, cleaning
  partial checkpoints) and hold it until the run's last write.
* Never delete ``.lock`` while holding it (``--overwrite`` removes everything else with
  :func:`clear_run_folder`): a second run would create a new file and lock that one.
  :func:`acquire_run_lock` re-checks after locking that the file it locked is still the one at
  ``.lock``, which covers a file deleted before.
* The descriptor is close-on-exec, so programs the run starts do not inherit the lock; forked
  workers (e.g. DataLoader's) do, and the lock is released when the last of them exits.
* On NFS, ``flock`` is emulated with byte-range locks (Linux >= 2.6.12) and works between hosts;
  the message then names the other host.

**Atomic, durable writes** (:func:`atomic_folder`, :func:`atomic_file`; checkpoints and the
exported model share them). :func:`atomic_folder` is the one recipe: write everything into ``<name>.tmp-<random>`` beside the
target, ``fsync`` every file and every folder in it, ``rename`` it onto the target, ``fsync`` the
parent folder. A crash (``kill -9``, power loss) at any moment leaves either the old target or the
new one, never a half-written folder under the target's name; PyTorch's distributed checkpoint
writer (``torch.distributed.checkpoint.filesystem``) fsyncs the same way before it commits.

Names beside a target, and what :func:`clean_partial` does with each after a crash:

* ``<name>.tmp-*``: a write that never finished; deleted.
* ``<name>.old-*``: the previous target, moved aside while a new one replaces it (Linux cannot
  rename a folder onto a non-empty one); deleted once the new target is in place, renamed back
  when the crash came between the two renames and the target is missing.
* ``<name>.del-*``: a folder being deleted (renamed first so a half-deleted checkpoint never
  looks complete); deleted.

A full disk (``ENOSPC``/``EDQUOT``, from Python or from safetensors' Rust writer) becomes one line
naming the folder, the bytes the write needed and the bytes free; the partial folder is removed
and the previous target is left as it was.

``FASTMID_TEST_PAUSE_SAVE=<point>`` makes a write sleep at that point (a file name, or
``:synced``, ``:moved-aside``, ``:renamed``) after printing ``fastmid-test: paused at <point> (pid
<pid>)`` to stderr, so the fault tests can ``kill -9`` a real process there. It is read only by
:func:`pause_point`; nothing else changes when it is unset.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from fastmid.errors import FastmidError

PAUSE_ENV = "FASTMID_TEST_PAUSE_SAVE"

# errno values meaning "no room": a full disk, or a full quota.
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# safetensors' Rust writer reports I/O errors as SafetensorError text, without an errno attribute.
_DISK_FULL_TEXT = ("os error 28", "os error 122", "No space left on device", "Disk quota exceeded")
_PARTIAL_KINDS = ("tmp", "old", "del")


class AtomicWriteError(FastmidError, OSError):
    """A folder or file could not be written (disk full, permissions); the message names it."""


def pause_point(point: str) -> None:
    """Test-only hook: sleep forever at ``point`` when ``$FASTMID_TEST_PAUSE_SAVE`` names it.

    Prints ``fastmid-test: paused at <point> (pid <pid>)`` to stderr first so the test knows what
    to kill and when.
    """
    if os.environ.get(PAUSE_ENV) == point:
        sys.stderr.flush()
        # one write(2): lines of several paused processes sharing a pipe never interleave
        os.write(2, f"fastmid-test: paused at {point} (pid {os.getpid()})\n".encode())
        while True:  # the test kills this process with SIGKILL
            time.sleep(3600)


def make_readable(path: Path) -> None:
    """Give a written folder (or file) the usual permissions (dirs 755, files 644).

    ``tempfile.mkdtemp`` creates folders readable by the owner only and safetensors may write
    owner-only files; a model folder is meant to be shared, like the rest of the run folder.
    """
    path = Path(path)
    if path.is_file():
        path.chmod(0o644)
        return
    path.chmod(0o755)
    for child in path.rglob("*"):
        child.chmod(0o755 if child.is_dir() else 0o644)


def fsync_path(path: Path) -> None:
    """``fsync`` one file or folder (a folder's fsync makes its entries, e.g. a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """``fsync`` every file under ``root``, then every folder bottom-up, ``root`` last."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the disk or quota is full."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(cur) for text in _DISK_FULL_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def format_bytes(n: int) -> str:
    """``123456789`` -> ``'117.7 MiB (123,456,789 bytes)'``."""
    if n < 1024:
        return f"{n} bytes"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]} ({n:,} bytes)"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_message(target: Path, what: str, bytes_needed: int | None, keep_note: str) -> str:
    """One line: which folder, how many bytes the write needed, how many are free, what is kept."""
    need = f"needs about {format_bytes(bytes_needed)}" if bytes_needed is not None else ""
    free = _free_bytes(target.parent)
    have = f"{format_bytes(free)} free" if free is not None else ""
    sizes = ", ".join(s for s in (need, have) if s)
    return (
        f"{target.parent}: disk full while writing the {what} {target.name}"
        f"{f' ({sizes})' if sizes else ''}; nothing partial was left{keep_note}; free space "
        "on that disk or choose another --output"
    )


def _partial_name(target: Path, kind: str) -> Path:
    """A fresh, unused ``<name>.<kind>-<random>`` path beside ``target`` (not created)."""
    while True:
        path = target.parent / f"{target.name}.{kind}-{secrets.token_hex(4)}"
        if not path.exists():
            return path


def remove_folder(folder: Path) -> None:
    """Delete a folder so that a crash midway never leaves it half-deleted under its own name:
    rename it to ``<name>.del-*`` first (atomic), then delete that."""
    if not folder.exists():
        return
    doomed = _partial_name(folder, "del")
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def atomic_folder(
    target: Path,
    *,
    what: str,
    bytes_needed: int | None = None,
    error: type[FastmidError] = AtomicWriteError,
    keep_note: str = "",
) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on a clean exit make it ``target``, durably.

    Steps on exit: permissions 755/644 (:func:`make_readable`), ``fsync`` of every file and folder
    in the temp folder, move an existing ``target`` aside (``<name>.old-*``), ``rename`` the temp
    folder onto ``target``, ``fsync`` the parent, delete the old one. On any exception the temp
    folder is removed and an old ``target`` put back.

    Args:
        target: the final folder; its parent is created if missing.
        what: words for messages (``"checkpoint"``, ``"model export"``).
        bytes_needed: estimated size of the write, named in the disk-full message.
        error: the :class:`FastmidError` subclass raised for a full disk.
        keep_note: appended to the disk-full message (e.g. ``"; checkpoint step-4 is intact"``).

    Raises:
        error: the disk or quota filled up (``ENOSPC``/``EDQUOT``) while writing or syncing.
        Any other exception of the body, unchanged, after the temp folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    aside: Path | None = None
    try:
        yield tmp
        make_readable(tmp)
        fsync_tree(tmp)
        pause_point(":synced")
        if target.exists():  # a re-save of the same step, a re-export: move the old one aside
            aside = _partial_name(target, "old")
            target.rename(aside)
            pause_point(":moved-aside")
        tmp.rename(target)
        pause_point(":renamed")
        fsync_path(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and aside.exists() and not target.exists():
            aside.rename(target)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise error(disk_full_message(target, what, bytes_needed, keep_note)) from exc
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_file(
    target: Path,
    *,
    what: str,
    bytes_needed: int | None = None,
    error: type[FastmidError] = AtomicWriteError,
) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on a clean exit fsync it, rename it onto ``target``
    (atomic for files) and fsync the parent. Same errors as :func:`atomic_folder`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(target, "tmp")
    try:
        yield tmp
        make_readable(tmp)
        fsync_path(tmp)
        tmp.replace(target)
        fsync_path(target.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise error(disk_full_message(target, what, bytes_needed, "")) from exc
        raise


def clean_partial(parent: Path, name_pattern: str) -> list[Path]:
    """Remove what interrupted writes left beside targets named by ``name_pattern``.

    Only call this while no other process writes there (hold the run lock,
    :func:`fastmid.train.runfolder.acquire_run_lock`): a live writer's temp folder looks the same.

    Args:
        parent: the folder holding the targets (``<run>/checkpoints``, ``<run>``).
        name_pattern: a regular expression for the target names (e.g. ``step-\\d+``, ``final``).

    Returns:
        The partial folders and files that no longer exist under their partial name: deleted
        ones, and an ``.old-*`` folder renamed back onto its missing target.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    regex = re.compile(rf"^({name_pattern})\.({'|'.join(_PARTIAL_KINDS)})-[A-Za-z0-9_]+$")
    cleaned: list[Path] = []
    for child in sorted(parent.iterdir()):
        match = regex.match(child.name)
        if not match:
            continue
        target = parent / match.group(1)
        if match.group(2) == "old" and not target.exists():
            child.rename(target)  # the crash came between moving the old one aside and the rename
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
        cleaned.append(child)
    if cleaned:
        fsync_path(parent)
    return cleaned


# ---- one live run per folder --------------------------------------------------------------------

LOCK_NAME = ".lock"


class RunLockError(FastmidError, RuntimeError):
    """The run folder's lock file cannot be created or opened (the path and reason named)."""


class RunLockedError(RunLockError):
    """Another live fastmid run holds this run folder; the message names its PID and start time."""


class RunLock:
    """A held lock on a run folder; release with :meth:`release` or use it as a context manager.

    Attributes:
        path: the lock file ``<run>/.lock``.
        pid: this process's id; started: when the lock was taken (ISO 8601, local time with
            offset).
    """

    def __init__(self, path: Path, fd: int, started: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.started = started
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock (not yet released)."""
        return self._fd is not None

    def release(self) -> None:
        """Unlock and close; the file stays (deleting it would race with the next acquirer).
        Idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file says "free" to a person looking at it
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor of the open file drops the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A lock object dropped without release() must not keep the folder locked for the rest of
        # a long-lived process (tests, notebooks).
        try:
            self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"RunLock({self.path}, pid={self.pid}, started={self.started}, held={self.held})"


def _read_holder(path: Path) -> dict[str, Any]:
    """The holder's record; waits briefly because it writes the record just after locking."""
    for _ in range(20):
        try:
            text = path.read_text()
        except OSError:
            text = ""
        if text.strip():
            try:
                data = json.loads(text)
                if isinstance(data, dict):
                    return data
            except ValueError:
                pass
        time.sleep(0.025)
    return {}


def acquire_run_lock(run_dir: Path) -> RunLock:
    """Take the exclusive lock of ``run_dir`` (created if missing) without waiting.

    Args:
        run_dir: the run folder (``--output``).

    Returns:
        The held :class:`RunLock`; ``<run_dir>/.lock`` then records this process's PID, start
        time (ISO 8601), host and command line.

    Raises:
        RunLockedError: a live process holds it: "``<run_dir>`` is in use by another fastmid run
            (PID 1234 on host h, started 2026-05-01T12:00:00+00:00) ...", one line.
        RunLockError: ``run_dir`` is a file, or the lock file cannot be created or opened.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunLockError(f"--output {run_dir}: a file is in the way; choose a folder") from None
    except OSError as exc:
        raise RunLockError(
            f"--output {run_dir}: cannot create the folder ({exc.strerror})"
        ) from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunLockError(f"{path}: cannot open the run lock ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(_locked_message(run_dir, _read_holder(path))) from None
        except OSError as exc:
            os.close(fd)
            raise RunLockError(f"{path}: cannot lock the run folder ({exc.strerror})") from None
        # The file we locked may have been deleted and re-created between our open and our flock
        # (another run's --overwrite); then our lock guards nothing: try again on the new file.
        try:
            mine, now = os.fstat(fd), os.stat(path)
            same = (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record = {
        "pid": os.getpid(),
        "started": started,
        "host": socket.gethostname(),
        "argv": sys.argv,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd, started)


def _locked_message(run_dir: Path, holder: dict[str, Any]) -> str:
    pid = holder.get("pid", "unknown")
    started = holder.get("started", "unknown time")
    host = holder.get("host")
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    return (
        f"{run_dir} is in use by another fastmid run (PID {pid}{where}, started {started}); "
        "wait for it to finish or stop it, or choose another --output"
    )


def clear_run_folder(run_dir: Path) -> list[Path]:
    """Delete everything in ``run_dir`` except its lock file (``--overwrite`` under the lock).

    Returns:
        The entries removed.
    """
    removed = []
    for child in sorted(Path(run_dir).iterdir()):
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
        removed.append(child)
    return removed
