"""glibc ``malloc`` settings for Dask worker processes, with a valve for memory pressure.

``distributed`` starts its worker processes with ``MALLOC_TRIM_THRESHOLD_=65536`` so that
freed memory goes back to the operating system promptly. Setting any of glibc's malloc
thresholds also turns off its adaptive mmap threshold, which otherwise rises to 32 MiB in
a process that frees large blocks. The worker then serves every buffer larger than
128 KiB (each chunk read from a store, each float64 copy of it, each block of sufficient
statistics) with a fresh ``mmap`` that the kernel zero-fills page by page and unmaps on
``free``: for 16 MB chunks that costs as much as the arithmetic. Measured on this
project's benchmark (8 runs, 2 single-threaded workers with 512 MiB each, OLS): 9.3 s
under distributed's setting, 5.9 s with both thresholds at 32 MiB, for peak worker memory
0.21 -> 0.35 GiB (a lower trim threshold gave back less time: 8 MiB 7.3 s, 16 MiB 6.4 s).

:func:`tune`, called at the start of every task that handles chunks, sets both thresholds
to 32 MiB (glibc's own adaptive ceiling) the first time, when the process's environment
sets the trim threshold without an mmap threshold (distributed's default, or a user's
``MALLOC_TRIM_THRESHOLD_``); a ``MALLOC_MMAP_THRESHOLD_`` in the environment is left as
the user chose it, and so is any process without glibc.

The memory malloc then keeps for the next chunk is not Dask's to spill: a worker whose
live data are already near its limit (a long run with hundreds of regressors on a 512 MiB
worker) could be pushed over the pause threshold and stay there. So in a worker with a
memory limit, whenever the process's resident memory is above :data:`PRESSURE` of the
limit the free memory is handed back (``malloc_trim``), which is distributed's own
behaviour, only under pressure. That is checked at the start of every later task and,
because a paused worker starts no tasks, every :data:`WATCH_MS` milliseconds on the
worker's event loop as well: checked in tasks alone, a worker paused with only free
memory resident waited minutes for something else to shrink it (the 16x scaling
benchmark, 257 regressors on one 512 MiB worker).

If the process is still above the mark once its free memory is handed back, its live
data alone fill the margin, and memory kept for reuse would only be trimmed and faulted
in again, or push the worker to spill and pause: the worker then goes back to
distributed's settings (mmap threshold 128 KiB, its trim threshold) for the rest of its
life. Measured on that benchmark: 150 s with the tuned thresholds trimmed under pressure,
120 s with distributed's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

__all__ = ["PRESSURE", "THRESHOLD", "WATCH_MS", "tune"]

logger = logging.getLogger(__name__)

#: Bytes: blocks below this come from malloc's arenas; free space above this at the top
#: of an arena is returned to the system.
THRESHOLD = 32 * 2**20

#: Fraction of the worker's memory limit above which free memory is returned at once
#: (below distributed's spill threshold, 0.7 by default).
PRESSURE = 0.6

#: Milliseconds between checks of the pressure mark on a worker's event loop (distributed
#: checks its own pause and spill thresholds every 100 ms).
WATCH_MS = 250

#: glibc's default mmap threshold (malloc.h's ``DEFAULT_MMAP_THRESHOLD_MIN``), the one
#: distributed's workers run with, and its default trim threshold.
_GLIBC_MMAP_THRESHOLD = 128 * 2**10
_GLIBC_TRIM_THRESHOLD = 128 * 2**10

#: glibc's ``mallopt`` parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class _State:
    """What :func:`tune` found in this process."""

    def __init__(self) -> None:
        self.applied = False
        self.libc: Any = None
        self.limit = 0  # the Dask worker's memory limit in bytes, 0 if none
        self.process: Any = None  # psutil.Process of this process, when there is a limit


#: None until the first call of :func:`tune` in this process.
_state: _State | None = None


def tune() -> bool:
    """Apply the thresholds in this process if it needs them, and relieve memory pressure.

    Returns
    -------
    bool
        Whether this process runs with the thresholds set here.

    Examples
    --------
    >>> isinstance(tune(), bool)
    True
    """
    global _state
    if _state is None:
        _state = _apply()
    elif _state.limit:
        _relieve(_state)
    return _state.applied


def _apply() -> _State:
    state = _State()
    if not sys.platform.startswith("linux"):
        return state
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return state
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    state.applied = (
        mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, THRESHOLD) == 1
    )
    state.libc = libc
    worker = _worker() if state.applied else None
    state.limit = int(getattr(worker.memory_manager, "memory_limit", None) or 0) if worker else 0
    if state.limit:
        import psutil

        state.process = psutil.Process()
        _watch(worker, state)
    logger.debug("malloc thresholds at %d bytes: %s", THRESHOLD, state.applied)
    return state


def _worker() -> Any:
    """The Dask worker running this task, None if none."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker()
    except ValueError:  # not in a worker
        return None


def _watch(worker: Any, state: _State) -> None:
    """Check the pressure mark periodically on the worker's event loop, paused or not.

    The callback joins the worker's own, which the worker stops when it closes."""
    from tornado.ioloop import PeriodicCallback

    callback = PeriodicCallback(lambda: _relieve(state), WATCH_MS)
    worker.periodic_callbacks["bigglm-malloc-trim"] = callback
    worker.loop.add_callback(callback.start)  # started from the loop's own thread


def _relieve(state: _State) -> None:
    """Return free memory to the system when the process is above the pressure mark;
    back off to the environment's settings if that is not enough."""
    if not state.limit or state.process.memory_info().rss <= PRESSURE * state.limit:
        return
    state.libc.malloc_trim(0)
    if state.process.memory_info().rss > PRESSURE * state.limit:
        _restore(state)


def _restore(state: _State) -> None:
    """The thresholds the process started with: glibc's mmap threshold, the
    environment's trim threshold."""
    try:
        trim = int(os.environ.get("MALLOC_TRIM_THRESHOLD_", ""))
    except ValueError:  # glibc ignores a value it cannot parse; so does this
        trim = _GLIBC_TRIM_THRESHOLD
    state.libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD)
    state.libc.mallopt(_M_TRIM_THRESHOLD, trim)
    state.libc.malloc_trim(0)
    state.applied = False
    state.limit = 0  # nothing more to watch: the worker runs as distributed set it up
    logger.info("memory near the worker's limit: malloc thresholds back to distributed's")
