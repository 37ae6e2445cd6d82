"""How a fit is computed: its finish tasks on a scheduler, progress, and thread pools.

A lazy :class:`~bigglm.glm.result.GLMResult` holds one finish task per voxel block (the
graph of :mod:`bigglm.glm.engine`). :func:`compute_blocks` computes them: on a
``distributed`` client each block's result is fetched as soon as it is done and released
on the worker, so workers never hold the whole result; on Dask's local schedulers a
callback counts the finished blocks. Either way a progress callback hears ``(done,
total)``. The per-voxel work that follows in this process (contrast variances, the tails
of the t and F distributions) is NumPy and SciPy code that releases the GIL:
:func:`over_voxel_slices` spreads it over a thread pool.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from itertools import pairwise
from typing import TYPE_CHECKING, Any, TypeVar

import dask
import numpy as np
from dask.callbacks import Callback
from dask.delayed import Delayed

from bigglm.typing import ProgressCallback

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["compute_blocks", "on_scheduler", "over_voxel_slices"]

_T = TypeVar("_T")

#: Fewest voxels per slice worth a thread of their own.
_MIN_SLICE = 16_384


def compute_blocks(
    tasks: list[Delayed], client: Client | None, progress: ProgressCallback | None
) -> list[Any]:
    """The values of a fit's finish tasks, in order, on ``client`` or Dask's default scheduler.

    Parameters
    ----------
    tasks : list of dask.delayed.Delayed
        One finish task per voxel block.
    client : distributed.Client, optional
        Where to compute; None: Dask's default scheduler.
    progress : callable, optional
        Called with ``(done, total)`` finished blocks.

    Returns
    -------
    list
        The tasks' values, in the order of ``tasks``.

    Examples
    --------
    >>> compute_blocks([dask.delayed(sum)([1, 2]), dask.delayed(max)([1, 2])], None, None)
    [3, 2]
    """
    if client is not None:
        return _stream_from_client(tasks, client, progress)
    with _FinishCounter(progress, len(tasks)), _design_in_graph():
        return list(dask.compute(*tasks))


def _stream_from_client(
    tasks: list[Delayed], client: Client, progress: ProgressCallback | None
) -> list[Any]:
    """:func:`compute_blocks` on a client, fetching and releasing each block as it is done."""
    from distributed import as_completed

    total = len(tasks)
    # Each block's result is fetched as soon as it is done and released on the
    # worker, so workers never hold the whole result (beta alone is P x V float64).
    with _design_in_graph():
        futures = client.compute(tasks)
    slots: dict[str, list[int]] = {}
    for i, future in enumerate(futures):
        slots.setdefault(future.key, []).append(i)
    values: list[Any] = [None] * total
    done = 0
    stream = as_completed(futures, loop=client.loop, with_results=True)
    del futures
    for future, value in stream:
        for i in slots.pop(future.key, []):
            values[i] = value
            done += 1
        future.release()
        if progress is not None:
            progress(done, total)
    return values


def on_scheduler(client: Client | None) -> AbstractContextManager[Any]:
    """Dask's default scheduler set to ``client`` within a ``with`` block (None: unchanged).

    Parameters
    ----------
    client : distributed.Client, optional

    Returns
    -------
    context manager

    Examples
    --------
    >>> with on_scheduler(None):
    ...     dask.delayed(sum)([1, 2]).compute()
    3
    """
    return dask.config.set(scheduler=client) if client is not None else nullcontext()


def over_voxel_slices(func: Callable[[slice], _T], n_vox: int) -> list[_T]:
    """``func`` of consecutive voxel slices, in order, computed on a thread pool.

    One slice per core, each at least ``16,384`` voxels (fewer voxels: one slice, on the
    calling thread).

    Parameters
    ----------
    func : callable
        Called with a ``slice`` of the voxels; it should release the GIL.
    n_vox : int

    Returns
    -------
    list
        ``func`` of each slice, in voxel order.

    Examples
    --------
    >>> over_voxel_slices(lambda sl: (sl.start, sl.stop), 10)
    [(0, 10)]
    """
    n_slices = max(1, min(os.cpu_count() or 1, n_vox // _MIN_SLICE))
    edges = np.linspace(0, n_vox, n_slices + 1).astype(int)
    slices = [slice(int(lo), int(hi)) for lo, hi in pairwise(edges)]
    if n_slices == 1:
        return [func(slices[0])]
    with ThreadPoolExecutor(n_slices) as pool:
        return list(pool.map(func, slices))


class _FinishCounter(Callback):
    """Report finished voxel blocks to a progress callback (local schedulers)."""

    def __init__(self, progress: ProgressCallback | None, total: int) -> None:
        super().__init__()
        self._progress, self._total, self._done = progress, total, 0

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if self._progress is not None and str(name).startswith("finish_block"):
            self._done += 1
            self._progress(self._done, self._total)


@contextmanager
def _design_in_graph() -> Iterator[None]:
    """Silence distributed's warning about a large graph when the graph is large because of
    the design: its terms are one task of the graph (the fit's graph holds them once, and
    the workers fetch them once), which is what that warning advises, not what it warns
    of. A wide design over a long run is tens of MB (39 MB for 257 columns x 6,400 scans)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        yield
