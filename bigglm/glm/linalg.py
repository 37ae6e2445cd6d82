"""Batched linear algebra across voxels: thread-safe products and small solves.

Two kinds of kernel, each vectorised over a wide voxel axis:

- :func:`serial_matmul`, a small matrix times a wide one on the calling thread. The fit
  runs many matrix products at once, one per Dask thread. OpenBLAS splits a product over
  all cores when ``m * n * k`` exceeds ``65536 * GEMM_MULTITHREAD_THRESHOLD``
  (``262144`` by default), so every thread of the scheduler would start its own team of
  BLAS threads: on a 2-core machine, 2 x 2 spinning threads. For the skinny products of
  the fit (a few dozen rows times a chunk of voxels) that threaded path is also slow on
  its own. :func:`serial_matmul` cuts the voxel dimension into pieces below the threshold
  and hands them to ``numpy.matmul`` as one stacked product, so the loop over pieces runs
  in C and every piece is a single-threaded BLAS call: no thread oversubscription and no
  dependence on ``threadpoolctl``.
- Solves of one small symmetric system per voxel (the whitened normal equations of AR
  models): :func:`cholesky_solve` for positive definite stacks, voxel axis last, and
  :func:`solve_psd` for the voxels it refuses and for rank-deficient designs (the
  Moore–Penrose solution).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["cholesky_solve", "serial_matmul", "solve_psd", "voxels_per_batch"]

Array = NDArray[np.float64]

#: OpenBLAS's default single-thread limit on ``m * n * k`` (SMP_THRESHOLD_MIN * 4).
_SERIAL_MNK = 65536 * 4

#: Below this many columns per piece the product is large enough to use BLAS threads.
_MIN_WIDTH = 16

#: Bytes of per-voxel ``P x P`` float64 matrices held at once by a batched kernel.
_BATCH_BYTES = 64 * 2**20


def voxels_per_batch(size: int) -> int:
    """How many voxels' ``size x size`` float64 matrices fit in one batch (at least 1).

    The bound on task memory where per-voxel matrices are formed (the AR GLS finish, the
    AR contrast covariances).

    Examples
    --------
    >>> voxels_per_batch(19), voxels_per_batch(10_000)
    (23237, 1)
    """
    return max(1, _BATCH_BYTES // (8 * size * size))


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


def cholesky_solve(gram: Array, rhs: Array) -> tuple[Array, NDArray[np.bool_]]:
    """``gram^-1 @ rhs`` for a stack of positive definite matrices, voxel axis last.

    A Cholesky factorisation of the diagonally equilibrated matrices, vectorised over
    the voxels (one short loop over the P columns, not one LAPACK call per voxel).

    Parameters
    ----------
    gram : numpy.ndarray, shape (P, P, v)
    rhs : numpy.ndarray, shape (P, k, v)

    Returns
    -------
    solution : numpy.ndarray, shape (P, k, v)
    ok : numpy.ndarray of bool, shape (v,)
        False where a pivot was not positive (not numerically positive definite):
        solve those voxels another way (:func:`solve_psd`).

    Examples
    --------
    >>> g = np.array([[4.0, 2.0], [2.0, 3.0]])[:, :, None]
    >>> x, ok = cholesky_solve(g, np.array([[1.0], [2.0]])[:, :, None])
    >>> x[:, 0, 0], ok
    (array([-0.125,  0.75 ]), array([ True]))
    """
    n = gram.shape[0]
    scale = np.sqrt(np.abs(np.einsum("iiv->iv", gram)))
    scale[scale == 0] = 1.0
    factor = gram / scale[:, None, :]
    factor /= scale[None, :, :]
    ok = np.ones(gram.shape[-1], dtype=bool)
    for j in range(n):  # the lower triangle of ``factor`` becomes L, column by column
        column = factor[j:, j] - np.einsum("ikv,kv->iv", factor[j:, :j], factor[j, :j])
        ok &= column[0] > 0
        pivot = np.sqrt(np.where(column[0] > 0, column[0], 1.0))
        factor[j, j] = pivot
        factor[j + 1 :, j] = column[1:] / pivot
    solution = rhs / scale[:, None, :]
    for i in range(n):  # forward: L z = b
        solution[i] -= np.einsum("kv,kjv->jv", factor[i, :i], solution[:i])
        solution[i] /= factor[i, i]
    for i in range(n - 1, -1, -1):  # back: L' x = z
        solution[i] -= np.einsum("kv,kjv->jv", factor[i + 1 :, i], solution[i + 1 :])
        solution[i] /= factor[i, i]
    solution /= scale[:, None, :]
    return solution, ok


def solve_psd(gram: Array, rhs: Array, rank: int) -> Array:
    """``gram^+ @ rhs`` for a stack of symmetric PSD matrices of known rank.

    Full rank: a batched LU solve of the diagonally equilibrated system (fast).
    Rank-deficient: the Moore–Penrose pseudo-inverse from the ``rank`` largest
    eigenpairs, so the betas are the minimum-norm solution (as ``pinv``); the rank
    is the design's (from its singular values), so the null space is cut exactly,
    not by a tolerance on the squared condition number of ``X'X``.

    Parameters
    ----------
    gram : numpy.ndarray, shape (v, P, P)
    rhs : numpy.ndarray, shape (v, P, k)
    rank : int

    Returns
    -------
    numpy.ndarray, shape (v, P, k)

    Examples
    --------
    >>> g = np.array([[[2.0, 2.0], [2.0, 2.0]]])
    >>> solve_psd(g, np.array([[[1.0], [1.0]]]), rank=1)
    array([[[0.25],
            [0.25]]])
    """
    n_cols = gram.shape[-1]
    if rank == n_cols:
        scale = np.sqrt(np.einsum("vii->vi", gram))
        scale[scale == 0] = 1.0
        scaled = gram / scale[:, :, None]
        scaled /= scale[:, None, :]
        return np.linalg.solve(scaled, rhs / scale[:, :, None]) / scale[:, :, None]
    # no equilibration here: a rescaled pseudo-inverse is a generalised inverse but not
    # the Moore-Penrose one, and the minimum-norm betas (as numpy and nilearn) need the latter
    values, vectors = np.linalg.eigh(gram)
    keep = vectors[..., n_cols - rank :]
    coef = np.einsum("vik,vij->vkj", keep, rhs) / values[..., n_cols - rank :, None]
    return np.einsum("vik,vkj->vij", keep, coef)
