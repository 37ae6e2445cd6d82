"""The conversion pipeline's moving parts: read ahead, gather rows of chunks, write behind.

Four stages overlap so that a conversion costs little more than reading its source:

- :func:`prefetched`: the source is read (and decompressed, which releases the GIL) in
  a background thread, one block of volumes ahead, into reused buffers;
- the SHA-256 of what is read is computed in a thread of its own
  (:class:`~bigglm.io.nifti.VolumeStream`), a few MiB behind the read;
- :func:`gather_rows`: the in-mask voxels of each block are gathered into rows of whole
  ``bold`` chunks (``time_chunk`` volumes by all in-mask voxels);
- :func:`write_rows`: each full row is compressed (two Blosc threads) and written by a
  writer thread while the next one is gathered.

The stages overlap, so a conversion takes about as long as its longest stage: the hash
for a ``.nii``, the decompression for a ``.nii.gz`` (README.md, "Benchmarks").

At any moment at most three read blocks, two rows and two chunks being encoded exist,
whatever the series length.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["gather_rows", "prefetched", "write_rows"]


def prefetched(blocks: Iterator[np.ndarray]) -> Generator[np.ndarray, None, None]:
    """Yield ``blocks``, produced by a background thread one block ahead of the consumer.

    An exception raised while producing is re-raised to the consumer; closing the
    generator (or an error in the consumer) stops the producer promptly.

    Examples
    --------
    >>> [int(block.sum()) for block in prefetched(iter([np.ones(2), np.ones(3)]))]
    [2, 3]
    """
    handoff: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()
    finished = object()

    def produce() -> None:
        try:
            for block in blocks:
                if not _put(handoff, block, stop):
                    return
            _put(handoff, finished, stop)
        except BaseException as err:
            _put(handoff, err, stop)

    thread = threading.Thread(target=produce, name="bigglm-read", daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _put(handoff: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item``, waiting while the queue is full; False if the consumer has stopped."""
    while not stop.is_set():
        try:
            handoff.put(item, timeout=0.1)
        except queue.Full:
            continue
        return True
    return False


def gather_rows(
    blocks: Iterator[np.ndarray], columns: np.ndarray, rows_per_chunk: int
) -> Iterator[np.ndarray]:
    """Re-block the ``columns`` of ``(n, voxels)`` blocks into ``(rows_per_chunk, V)`` rows.

    Two buffers alternate: the consumer may still be writing one row while the next
    fills, and must be done with it before asking for the row after next.

    Examples
    --------
    >>> blocks = iter([np.arange(12.0).reshape(3, 4), np.arange(12.0, 20.0).reshape(2, 4)])
    >>> [row.tolist() for row in gather_rows(blocks, np.array([3, 0]), 2)]
    [[[3.0, 0.0], [7.0, 4.0]], [[11.0, 8.0], [15.0, 12.0]], [[19.0, 16.0]]]
    """
    buffers = [np.empty((rows_per_chunk, columns.size), dtype=np.float32) for _ in range(2)]
    # Volume by volume, gather in memory order (a forward sweep the prefetcher follows),
    # then put the values in output order within a small, cache-resident vector: ~30 %
    # less CPU than one take along axis 1 when the blocks come cold from memory; and
    # ~25 % less again with mode="clip", which writes straight into ``out`` (the default
    # mode buffers it), the indices being checked against each block beforehand.
    by_position = np.argsort(columns, kind="stable")
    ascending = columns[by_position]
    order = np.empty_like(by_position)
    order[by_position] = np.arange(columns.size)
    gathered = np.empty(columns.size, dtype=np.float32)
    current, filled = 0, 0
    for block in blocks:
        if ascending.size and not 0 <= ascending[0] <= ascending[-1] < block.shape[1]:
            raise IndexError(f"columns out of range for blocks of {block.shape[1]} voxels")
        taken = 0
        while taken < block.shape[0]:
            n = min(rows_per_chunk - filled, block.shape[0] - taken)
            for row in range(n):
                np.take(block[taken + row], ascending, out=gathered, mode="clip")
                np.take(gathered, order, out=buffers[current][filled + row], mode="clip")
            filled += n
            taken += n
            if filled == rows_per_chunk:
                yield buffers[current]
                current, filled = 1 - current, 0
    if filled:
        yield buffers[current][:filled]


def write_rows(
    write: Callable[[int, np.ndarray], None],
    blocks: Iterator[np.ndarray],
    columns: np.ndarray,
    rows_per_chunk: int,
    *,
    check_finite: bool = False,
    report: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Read ahead, gather and write behind: ``write(start, rows)`` for every row of chunks.

    Parameters
    ----------
    write : callable
        Called as ``write(first_volume, rows)`` from a writer thread, one call at a time.
    blocks : iterator of numpy.ndarray
        ``(n, voxels)`` float32 volume blocks in time order.
    columns : numpy.ndarray
        The voxel positions to keep, in output order.
    rows_per_chunk : int
        Volumes per row (the time chunk).
    check_finite : bool
        Flag the columns holding NaN or Inf.
    report : callable, optional
        Called with the number of volumes handed to the writer so far.

    Returns
    -------
    numpy.ndarray
        Per column, whether it held a non-finite value (all False unless ``check_finite``).

    Examples
    --------
    >>> out = {}
    >>> blocks = iter([np.array([[1.0, np.nan], [2.0, 3.0]], np.float32)])
    >>> write_rows(out.__setitem__, blocks, np.array([0, 1]), 1, check_finite=True).tolist()
    [False, True]
    >>> sorted(out)
    [0, 1]
    """
    bad = np.zeros(columns.size, dtype=bool)
    start = 0
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigglm-write") as pool,
        contextlib.closing(prefetched(blocks)) as source,
    ):
        pending: Future[None] | None = None
        for rows in gather_rows(source, columns, rows_per_chunk):
            if check_finite:
                bad |= ~np.isfinite(rows).all(axis=0)
            if pending is not None:
                pending.result()
            pending = pool.submit(write, start, rows)
            start += rows.shape[0]
            if report is not None:
                report(start)
        if pending is not None:
            pending.result()
    return bad
