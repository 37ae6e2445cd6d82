"""Small-kernel matrix products that stay on the calling thread.

The fit runs many matrix products at once, one per Dask thread. OpenBLAS splits a
product over all cores when ``m * n * k`` exceeds ``65536 * GEMM_MULTITHREAD_THRESHOLD``
(``262144`` by default), so every thread of the scheduler would start its own team of
BLAS threads: on a 2-core machine, 2 x 2 spinning threads. For the skinny products of
the fit (a few dozen rows times a chunk of voxels) that threaded path is also slow on
its own. :func:`serial_matmul` cuts the voxel dimension into pieces below the threshold
and hands them to ``numpy.matmul`` as one stacked product, so the loop over pieces runs
in C and every piece is a single-threaded BLAS call: no thread oversubscription and no
dependence on ``threadpoolctl``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["serial_matmul"]

Array = NDArray[np.float64]

#: OpenBLAS's default single-thread limit on ``m * n * k`` (SMP_THRESHOLD_MIN * 4).
_SERIAL_MNK = 65536 * 4

#: Below this many columns per piece the product is large enough to use BLAS threads.
_MIN_WIDTH = 16


def serial_matmul(a: Array, b: Array, out: Array | None = None) -> Array:
    """``a @ b`` for a small ``a`` (m, k) and a wide ``b`` (k, n), without BLAS threads.

    Parameters
    ----------
    a : numpy.ndarray, shape (m, k)
    b : numpy.ndarray, shape (k, n)
        Any strides numpy's BLAS path accepts (e.g. C-contiguous or a column slice).
    out : numpy.ndarray, shape (m, n), optional
        Where to write the product (may be a column slice of a larger array).

    Returns
    -------
    numpy.ndarray, shape (m, n)

    Examples
    --------
    >>> a, b = np.arange(6.0).reshape(2, 3), np.arange(600.0).reshape(3, 200)
    >>> bool(np.allclose(serial_matmul(a, b), a @ b))
    True
    """
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.result_type(a, b))
    width = _SERIAL_MNK // max(1, m * k)
    if width < _MIN_WIDTH:
        return np.matmul(a, b, out=out)
    pieces = n // width
    cut = pieces * width
    if pieces:
        stacked_b = b[:, :cut].reshape(k, pieces, width).transpose(1, 0, 2)
        stacked_out = out[:, :cut].reshape(m, pieces, width).transpose(1, 0, 2)
        if not np.may_share_memory(stacked_out, out):  # reshape had to copy: no view
            return np.matmul(a, b, out=out)
        np.matmul(a, stacked_b, out=stacked_out)
    if cut < n:
        np.matmul(a, b[:, cut:], out=out[:, cut:])
    return out
