"""One live run per run folder: an exclusive ``flock`` on ``<run>/.lock``.

``flock`` belongs to the open file, so the operating system drops it when the holder exits for any
reason (``kill -9``, a crash, power loss with a local disk): a crashed run never blocks the next
one and there is no stale-lock logic to get wrong. The file stays in the folder between runs; what
it holds (``{"pid", "started", "host", "argv"}``, JSON) is only for the message a second run
prints, never for deciding whether the folder is free.

Notes for callers:

* Take the lock before anything reads or changes the folder (``--overwrite``, resume, cleaning
  partial checkpoints) and hold it until the run's last write.
* Never delete ``.lock`` while holding it (``--overwrite`` removes everything else with
  :func:`clear_run_folder`): a second run would create a new file and lock that one. :func:`acquire_run_lock` re-checks after locking
  that the file it locked is still the one at ``.lock``, which covers a file deleted before.
* The descriptor is close-on-exec, so programs the run starts do not inherit the lock; forked
  workers (e.g. DataLoader's) do, and the lock is released when the last of them exits.
* On NFS, ``flock`` is emulated with byte-range locks (Linux >= 2.6.12) and works between hosts;
  the message then names the other host.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from fastmid.errors import FastmidError

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
