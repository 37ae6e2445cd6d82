"""One lock file per unit, so two runs never write the same outputs at once."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bigglm.exceptions import StoreError
from bigglm.io.locks import Busy, exclusive
from bigglm.pipeline.plan import STATE

__all__ = ["lock_units"]

logger = logging.getLogger(__name__)


@contextmanager
def lock_units(outputs: str | Path, units: Sequence[str]) -> Iterator[None]:
    """Hold one lock file per unit in ``outputs`` for the duration of the block.

    A lock is an ``flock`` on ``<outputs>/.bigglm/locks/<unit>.lock``
    (:func:`bigglm.io.locks.exclusive`): the kernel grants it to one process at a time
    and frees it when its process dies, so a killed run's lock is free at once and two
    runs started together never both hold it. The file records the holder's host, PID
    and start time for the error message.

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
    """Hold ``path`` with :func:`bigglm.io.locks.exclusive`: atomic, and a dead holder's
    lock is free by construction (the kernel released it), so there is no takeover."""
    try:
        with exclusive(path, wait=False):
            yield
    except Busy as busy:
        holder = busy.holder or {}
        raise StoreError(
            f"{outputs}: {unit} is being written by another bigglm run (PID "
            f"{holder.get('pid')} on {holder.get('host')}, since "
            f"{holder.get('since')}); wait for it to finish or use another "
            "outputs.folder"
        ) from None
