"""glibc ``malloc`` settings for the Dask worker processes bigglm starts, and a pressure valve.

Why: ``distributed`` starts its worker processes with ``MALLOC_TRIM_THRESHOLD_=65536``
(its ``distributed.nanny.pre-spawn-environ``) so that freed memory goes back to the
operating system promptly. Setting any of glibc's malloc thresholds also turns off its
adaptive mmap threshold, which otherwise rises to 32 MiB in a process that frees large
blocks. Such a worker serves every buffer larger than 128 KiB (each chunk read from a
store, each float64 copy of it, each block of sufficient statistics) with a fresh
``mmap`` that the kernel zero-fills page by page and unmaps on ``free``: for chunk-sized
buffers that costs about as much as the arithmetic. Workers that start with both
thresholds at :data:`THRESHOLD` (glibc's own adaptive ceiling) reuse the pages they
already hold, and a fit takes markedly less time for a little more resident memory per
worker (a lower trim threshold gives back part of the gain). README.md, "Worker memory
allocator", has the measurements.

Where: only in processes bigglm starts itself, through distributed's and dask-jobqueue's
public settings. :func:`spawn_environ` puts the thresholds in
``distributed.nanny.pre-spawn-environ`` while a ``LocalCluster`` starts;
:func:`job_script_exports` writes them into a batch job's script, before the job's nanny
starts. A ``MALLOC_MMAP_THRESHOLD_`` of the user's, in the environment or in that dask
setting, means the user chose: then :func:`worker_environ` sets nothing. Under the
threaded scheduler, or on a client the user passes in, nothing here runs.

The valve: the memory malloc keeps for the next chunk is not Dask's to spill, so a worker
whose live data are already near its limit (hundreds of regressors on a small worker)
could be pushed over the pause threshold and stay there. :class:`MallocValve`, a worker
plugin, checks every :data:`WATCH_S` seconds on the worker's event loop (a paused worker
starts no tasks, so a check made in tasks would wait for something else to shrink it)
and, above :data:`PRESSURE` of the memory limit, hands the free memory back
(``malloc_trim``), which is distributed's own behaviour, only under pressure. If the
worker is still above the mark after that, or comes back over it after :data:`MAX_TRIMS`
trims, its live data alone fill the margin, and memory kept for reuse would only be
trimmed and faulted in again: the worker then goes back to distributed's settings for the
rest of its life (:func:`relief` decides).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from distributed import WorkerPlugin

__all__ = [
    "MAX_TRIMS",
    "PRESSURE",
    "THRESHOLD",
    "WATCH_S",
    "MallocValve",
    "job_script_exports",
    "relief",
    "spawn_environ",
    "worker_environ",
]

logger = logging.getLogger(__name__)

#: Bytes: blocks below this come from malloc's arenas; free space above this at the top
#: of an arena is returned to the system.
THRESHOLD = 32 * 2**20

#: Fraction of the worker's memory limit above which free memory is returned at once
#: (below distributed's spill threshold, 0.7 by default).
PRESSURE = 0.6

#: Seconds between checks of the pressure mark on a worker's event loop (distributed
#: checks its own pause and spill thresholds every 0.1 s).
WATCH_S = 0.25

#: Times a worker may go over the mark and be trimmed back under it before the valve
#: gives the thresholds up (a worker that keeps coming back to the mark is one whose live
#: data nearly fill its limit).
MAX_TRIMS = 3

#: What the valve does next: nothing, hand free memory back, or give up the thresholds.
Relief = Literal["none", "trim", "revert"]

#: The dask setting whose variables a nanny sets before it spawns a worker process.
_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"
_TRIM, _MMAP = "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"

#: glibc's default mmap threshold (malloc.h's ``DEFAULT_MMAP_THRESHOLD_MIN``), the one
#: distributed's workers run with, and its default trim threshold.
_GLIBC_MMAP_THRESHOLD = 128 * 2**10
_GLIBC_TRIM_THRESHOLD = 128 * 2**10

#: glibc's ``mallopt`` parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def worker_environ() -> dict[str, str]:
    """The malloc variables the worker processes bigglm starts should begin with.

    Returns
    -------
    dict of str to str
        ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` at :data:`THRESHOLD`;
        empty off Linux, or where the user set ``MALLOC_MMAP_THRESHOLD_`` in this
        process's environment or in ``distributed.nanny.pre-spawn-environ``.

    Examples
    --------
    >>> import dask
    >>> key = "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_"
    >>> with dask.config.set({key: 131072}):  # the user's own choice
    ...     worker_environ()
    {}
    """
    import dask

    configured = dask.config.get(_SPAWN_ENVIRON, default=None) or {}
    if not sys.platform.startswith("linux") or _MMAP in os.environ:
        return {}
    if configured.get(_MMAP) is not None:  # None unsets a variable in distributed's config
        return {}
    return {_TRIM: str(THRESHOLD), _MMAP: str(THRESHOLD)}


@contextmanager
def spawn_environ(environ: Mapping[str, str]) -> Iterator[None]:
    """Give the worker processes of a LocalCluster started inside ``environ``.

    Inside, ``environ`` joins ``distributed.nanny.pre-spawn-environ``. A nanny copies
    those variables into its own process's environment before it spawns a worker
    (distributed's way to have them in place before the worker's malloc starts), and
    prefers a variable already in that environment to the configured one. For a
    LocalCluster the nannies run in this process, so this process's own values of the
    variables are set aside inside (a ``MALLOC_TRIM_THRESHOLD_`` there is usually what an
    earlier cluster's nanny left) and all of them are put back on exit. glibc reads them
    only when a process starts: this process's own malloc never changes.

    Parameters
    ----------
    environ : mapping of str to str
        Variables from :func:`worker_environ`; empty changes nothing.

    Yields
    ------
    None

    Examples
    --------
    >>> import os
    >>> before = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    >>> with spawn_environ({"MALLOC_TRIM_THRESHOLD_": "33554432"}):
    ...     import dask
    ...     dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_")
    '33554432'
    >>> os.environ.get("MALLOC_TRIM_THRESHOLD_") == before
    True
    """
    if not environ:
        yield
        return
    import dask

    saved = {name: os.environ.pop(name, None) for name in environ}
    spawn = {**(dask.config.get(_SPAWN_ENVIRON, default=None) or {}), **environ}
    try:
        with dask.config.set({_SPAWN_ENVIRON: spawn}):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def job_script_exports(environ: Mapping[str, str]) -> list[str]:
    """Job-script lines that export ``environ`` before a batch job starts its nanny.

    The job's nanny prefers a variable in its environment to its own configuration, so
    it passes these on to the worker processes it spawns. A job whose environment has its
    own ``MALLOC_MMAP_THRESHOLD_`` (from the user's shell set-up) exports nothing.

    Parameters
    ----------
    environ : mapping of str to str
        Variables from :func:`worker_environ`; empty gives no lines.

    Returns
    -------
    list of str
        Shell lines for dask-jobqueue's ``job_script_prologue``.

    Examples
    --------
    >>> job_script_exports({"MALLOC_MMAP_THRESHOLD_": "33554432"})
    ['[ -n "${MALLOC_MMAP_THRESHOLD_+set}" ] || export MALLOC_MMAP_THRESHOLD_=33554432']
    >>> job_script_exports({})
    []
    """
    if not environ:
        return []
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in environ.items())
    return [f'[ -n "${{{_MMAP}+set}}" ] || export {assignments}']


def relief(
    rss: int, limit: int, *, trimmed: bool, mark: float = PRESSURE, trims: int = 0
) -> Relief:
    """What the valve does for a worker with ``rss`` bytes resident.

    Parameters
    ----------
    rss : int
        The worker process's resident memory, in bytes.
    limit : int
        The worker's memory limit in bytes; 0 for none.
    trimmed : bool
        Whether ``rss`` was measured just after handing free memory back.
    mark : float, optional
        Fraction of ``limit`` above which the valve acts (:data:`PRESSURE`).
    trims : int, optional
        How many times the worker's free memory was handed back before.

    Returns
    -------
    {"none", "trim", "revert"}
        ``"none"`` at or below the mark (or without a limit); above it ``"trim"``, or
        ``"revert"`` (back to distributed's settings) if a trim did not bring it down,
        or if the worker was above the mark :data:`MAX_TRIMS` times already: its live data
        then keep filling the margin, and memory kept for reuse would only be handed back
        and faulted in again, chunk after chunk.

    Examples
    --------
    >>> relief(500, 1000, trimmed=False)
    'none'
    >>> relief(700, 1000, trimmed=False)
    'trim'
    >>> relief(700, 1000, trimmed=True)
    'revert'
    >>> relief(700, 1000, trimmed=False, trims=MAX_TRIMS)
    'revert'
    """
    if not limit or rss <= mark * limit:
        return "none"
    return "revert" if trimmed or trims >= MAX_TRIMS else "trim"


class MallocValve(WorkerPlugin):
    """Hand free memory back, or give the thresholds up, when a worker nears its limit.

    Registered by :mod:`bigglm.cluster` on the clusters it starts with the thresholds of
    :func:`worker_environ`. On a worker without a memory limit, or whose process did not
    start with those thresholds, it does nothing.

    Parameters
    ----------
    mark : float, optional
        Fraction of the worker's memory limit above which it acts (:data:`PRESSURE`).
    interval : float, optional
        Seconds between checks (:data:`WATCH_S`).

    Attributes
    ----------
    reverted : bool
        On a worker: whether it went back to distributed's settings.

    Examples
    --------
    >>> valve = MallocValve()
    >>> valve.name, valve.reverted
    ('bigglm-malloc-valve', False)
    """

    name = "bigglm-malloc-valve"

    def __init__(self, *, mark: float = PRESSURE, interval: float = WATCH_S) -> None:
        self.mark = mark
        self.interval = interval
        # the trim threshold distributed gives its workers, to go back to
        self.fallback_trim = _configured_trim()
        self.reverted = False
        self.trims = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def watching(self) -> bool:
        """Whether the valve is checking this worker."""
        return self._task is not None and not self._task.done()

    async def setup(self, worker: Any) -> None:
        """Start checking the worker on its event loop, if it runs with the thresholds."""
        limit = int(worker.memory_manager.memory_limit or 0)
        libc = _glibc()
        if not limit or libc is None or os.environ.get(_MMAP) != str(THRESHOLD):
            return
        import psutil

        self._task = asyncio.create_task(self._watch(libc, psutil.Process(), limit))

    async def teardown(self, worker: Any) -> None:
        """Stop checking."""
        if self._task is not None:
            self._task.cancel()

    async def _watch(self, libc: Any, process: Any, limit: int) -> None:
        while not self._relieve(libc, process, limit):
            await asyncio.sleep(self.interval)

    def _relieve(self, libc: Any, process: Any, limit: int) -> bool:
        """One check; True once the worker went back to distributed's settings."""
        rss = process.memory_info().rss
        action = relief(rss, limit, trimmed=False, mark=self.mark, trims=self.trims)
        if action == "none":
            return False
        if action == "trim":
            libc.malloc_trim(0)
            self.trims += 1
            if relief(process.memory_info().rss, limit, trimmed=True, mark=self.mark) == "none":
                return False
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, self.fallback_trim)
        libc.malloc_trim(0)
        self.reverted = True
        logger.info("memory near the worker's limit: malloc thresholds back to distributed's")
        return True


def _configured_trim() -> int:
    """The trim threshold in ``distributed.nanny.pre-spawn-environ`` (65536 by default)."""
    import dask

    value: Any = (dask.config.get(_SPAWN_ENVIRON, default=None) or {}).get(_TRIM)
    try:
        return int(value)
    except (TypeError, ValueError):  # unset, or a value glibc would ignore too
        return _GLIBC_TRIM_THRESHOLD


def _glibc() -> Any:
    """This process's glibc with ``mallopt`` and ``malloc_trim`` typed; None without one."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc
