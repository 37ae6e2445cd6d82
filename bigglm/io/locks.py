"""Exclusive locks on lock files, released by the kernel when their process dies.

A lock is ``fcntl.flock`` on an open file: atomic (the kernel grants it to one open file
at a time), and never stale (a killed process's locks go with its file descriptors), so
no lock is ever "taken over". The lock file exists only while it is held: its holder
deletes it before letting go, and a process that locked a file which was deleted (or
replaced) meanwhile lets go and tries again, so two processes never hold locks on two
different files of the same name.

Local filesystems only are exact. On NFS, Linux maps ``flock`` to NFS byte-range locks
(``lockd``), which work between hosts but can be lost if the server restarts; bigglm's
pipeline also records the holder in the file for the error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["Busy", "exclusive", "holder_of", "me"]

#: Lock files this thread holds (a nested request for the same file is granted at once).
_HELD = threading.local()


class Busy(Exception):
    """Raised by :func:`exclusive` with ``wait=False`` when another holds the lock."""

    def __init__(self, path: Path, holder: dict[str, Any] | None) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


def me() -> dict[str, Any]:
    """This process: host, PID, process start time and the time now."""
    import psutil

    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "created": psutil.Process(pid).create_time(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@contextmanager
def exclusive(path: Path, *, wait: bool = True, reentrant: bool = False) -> Iterator[None]:
    """Hold the lock file ``path`` (created, and deleted on release) for the block.

    Parameters
    ----------
    path : pathlib.Path
        The lock file; its folder must exist.
    wait : bool
        Wait for the holder to let go; otherwise raise :class:`Busy` at once.
    reentrant : bool
        Grant the lock at once if this thread already holds it with ``reentrant``
        (otherwise a second request from the same thread is refused or waits forever).

    Examples
    --------
    >>> import tempfile
    >>> lock = Path(tempfile.mkdtemp()) / "x.lock"
    >>> with exclusive(lock):
    ...     lock.exists()
    True
    >>> lock.exists()
    False
    """
    held: set[str] = _HELD.__dict__.setdefault("paths", set())
    key = os.path.abspath(path)
    if reentrant and key in held:
        yield
        return
    fd = _acquire(path, wait=wait)
    if reentrant:
        held.add(key)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me()).encode(), 0)
        yield
    finally:
        held.discard(key)
        os.unlink(path)  # while still holding it: a waiter sees it gone and starts again
        os.close(fd)


def _acquire(path: Path, *, wait: bool) -> int:
    """An open descriptor of ``path`` holding its lock (the file now at ``path``)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise Busy(path, holder_of(path)) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder deleted it as we waited: lock the new one


def holder_of(path: Path) -> dict[str, Any] | None:
    """Who holds (or last held) a lock file, as it recorded itself; None if unknown."""
    return read_record(path)


def read_record(path: Path) -> dict[str, Any] | None:
    """A small JSON object bigglm recorded (a lock's holder, a folder's owner), or None
    if the file is absent, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def alive(holder: dict[str, Any]) -> bool:
    """Whether a recorded process still runs; processes on other hosts count as alive.

    Examples
    --------
    >>> alive(me()), alive({**me(), "created": 0.0}), alive({**me(), "host": "elsewhere"})
    (True, False, True)
    """
    import psutil

    if holder.get("host") != socket.gethostname():
        return True
    try:
        process = psutil.Process(int(holder["pid"]))
        return abs(process.create_time() - float(holder["created"])) < 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False
