"""One lock file per unit, so two runs never write the same outputs at once."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bigglm.exceptions import StoreError
from bigglm.pipeline.plan import STATE

__all__ = ["lock_units"]

logger = logging.getLogger(__name__)


@contextmanager
def lock_units(outputs: str | Path, units: Sequence[str]) -> Iterator[None]:
    """Hold one lock file per unit in ``outputs`` for the duration of the block.

    A lock records the holder's host, PID and process start time. A lock whose process
    is gone (same host) is stale and taken over; any other existing lock makes this
    refuse, so two runs never write the same outputs at once.

    Parameters
    ----------
    outputs : str or Path
        The analysis output folder.
    units : sequence of str
        Unit names to lock (taken in sorted order, released on exit).

    Raises
    ------
    StoreError
        If another live process holds one of the locks.

    Examples
    --------
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> with lock_units(out, ["sub-01"]):
    ...     with lock_units(out, ["sub-01"]):
    ...         pass
    Traceback (most recent call last):
    ...
    bigglm.exceptions.StoreError: ...sub-01 is being written by another bigglm run (PID ...
    """
    folder = Path(outputs) / STATE / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        for unit in sorted(set(units)):
            stack.enter_context(_lock_file(folder / f"{unit}.lock", Path(outputs), unit))
        yield


@contextmanager
def _lock_file(path: Path, outputs: Path, unit: str) -> Iterator[None]:
    me = _holder()
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(me))
    try:
        for _ in range(2):
            try:
                os.link(temp, path)
                break
            except FileExistsError:
                holder = _read_holder(path)
                if holder is not None and _alive(holder):
                    raise StoreError(
                        f"{outputs}: {unit} is being written by another bigglm run (PID "
                        f"{holder.get('pid')} on {holder.get('host')}, since "
                        f"{holder.get('since')}); wait for it to finish or use another "
                        f"outputs.folder (if that run is dead, delete {path})"
                    ) from None
                logger.warning("taking over the stale lock %s (%s)", path, holder)
                path.unlink(missing_ok=True)
        else:  # pragma: no cover - lost a race twice
            raise StoreError(f"{path}: could not take the lock; try again")
    finally:
        temp.unlink(missing_ok=True)
    try:
        yield
    finally:
        if _read_holder(path) == me:
            path.unlink(missing_ok=True)


def _holder() -> dict[str, Any]:
    import psutil

    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "created": psutil.Process(pid).create_time(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether a lock's process still runs; locks from other hosts count as alive."""
    import psutil

    if holder.get("host") != socket.gethostname():
        return True
    try:
        process = psutil.Process(int(holder["pid"]))
        return abs(process.create_time() - float(holder["created"])) < 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False
