"""Per-chunk sufficient statistics of the GLM, and how two of them combine.

A chunk is a block of consecutive scans for a block of voxels. Everything the fit needs
is a sum over scans of products of the data with the (known) design or with itself, so
each chunk contributes its own sums and two partial results for adjacent scan ranges
combine by addition, plus the products of the lag pairs that straddle their boundary.
All sums are in float64 on data minus a per-voxel offset (the voxel's first value), which
keeps ``Y'Y - b'X'Y`` accurate when the mean is 10,000 times the noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bigglm.glm.ar import Ar1Basis
from bigglm.glm.linalg import serial_matmul

__all__ = ["DesignTerms", "Partial", "chunk_statistics", "combine"]

Array = NDArray[np.float64]

#: Size of the float64 voxel slab a chunk is converted to, one slab at a time.
_SLAB_BYTES = 2 * 2**20


@dataclass(frozen=True)
class DesignTerms:
    """Everything about one run's design that the chunks and the finish need.

    Built once on the client and given to the graph as one object.

    Attributes
    ----------
    matrix : numpy.ndarray, shape (T, P)
        The design X.
    order : int
        AR order p (0 for OLS).
    lag_design : numpy.ndarray, shape (p + 1, T, P)
        ``X`` and ``(L^m + F^m) X`` for m = 1..p (L shifts down, F up, zero fill).
    lag_gram : numpy.ndarray, shape (p + 1, P, P)
        ``X' lag_design[m]``.
    rank : int
        Rank of X (from its singular values).
    gram_pinv : numpy.ndarray, shape (P, P)
        ``(X'X)^+`` computed from the SVD of X.
    constant_fit : numpy.ndarray or None, shape (P,)
        ``pinv(X) @ 1`` when the design spans the constant (then a per-voxel offset
        changes only the betas, by ``constant_fit * offset``); None otherwise.
    ar1 : Ar1Basis or None
        For AR(1) noise, the basis in which every voxel's whitened Gram is a diagonal
        plus a rank-2 term (:class:`~bigglm.glm.ar.Ar1Basis`); None otherwise.

    Examples
    --------
    >>> terms = DesignTerms.build(np.ones((4, 1)), order=1)
    >>> terms.lag_design[1, :, 0]
    array([1., 2., 2., 1.])
    """

    matrix: Array
    order: int
    lag_design: Array
    lag_gram: Array
    rank: int
    gram_pinv: Array
    constant_fit: Array | None
    ar1: Ar1Basis | None = None

    @classmethod
    def build(cls, matrix: ArrayLike, order: int) -> DesignTerms:
        """Precompute the lagged designs, Gram matrices and pseudo-inverse.

        Parameters
        ----------
        matrix : array_like, shape (T, P)
        order : int
            AR order p, 0 for OLS.

        Returns
        -------
        DesignTerms

        Examples
        --------
        >>> DesignTerms.build(np.eye(3), order=0).rank
        3
        """
        x = np.asarray(matrix, dtype=np.float64)
        lagged = [x] + [_shift(x, m) + _shift(x, -m) for m in range(1, order + 1)]
        lag_design = np.stack(lagged)
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        tol = s.max(initial=0.0) * max(x.shape) * np.finfo(np.float64).eps
        rank = int((s > tol).sum())
        v_r = vt[:rank].T / s[:rank]
        pinv = v_r @ u[:, :rank].T
        ones = np.ones(x.shape[0])
        fit = pinv @ ones
        spans = np.allclose(x @ fit, ones, rtol=0.0, atol=1e-8)
        return cls(
            matrix=x,
            order=order,
            lag_design=lag_design,
            lag_gram=np.einsum("ta,mtb->mab", x, lag_design),
            rank=rank,
            gram_pinv=v_r @ v_r.T,
            constant_fit=fit if spans else None,
            ar1=Ar1Basis.build(x, rank, (u, s, vt)) if order == 1 else None,
        )


def _shift(x: Array, m: int) -> Array:
    """Rows moved down by m (``out[t] = x[t - m]``), or up when m < 0; zero fill."""
    out = np.zeros_like(x)
    if m > 0:
        out[m:] = x[:-m]
    else:
        out[:m] = x[-m:]
    return out


@dataclass(frozen=True)
class Partial:
    """Sufficient statistics of a run of consecutive scans for a block of voxels.

    Attributes
    ----------
    cross : numpy.ndarray, shape (p + 1, P, v)
        ``lag_design[m]' Y`` summed over the scans.
    lag_sums : numpy.ndarray, shape (p + 1, v)
        ``sum_t y_t y_(t-m)`` over the pairs inside the scan range.
    head, tail : numpy.ndarray, shape (p, v)
        The first and the last p rows of (offset) Y in the range.
    """

    cross: Array
    lag_sums: Array
    head: Array
    tail: Array


def chunk_statistics(
    block: ArrayLike, offset: ArrayLike, terms: DesignTerms, start: int
) -> Partial:
    """Sufficient statistics of one chunk.

    Parameters
    ----------
    block : array_like, shape (n, v)
        Data for scans ``start .. start + n - 1`` (any float dtype).
    offset : array_like, shape (v,) or (1, v)
        Per-voxel value subtracted before accumulating.
    terms : DesignTerms
    start : int
        Index of the chunk's first scan.

    Returns
    -------
    Partial

    Examples
    --------
    >>> terms = DesignTerms.build(np.ones((4, 1)), order=1)
    >>> part = chunk_statistics(np.arange(4.0)[:, None], np.zeros(1), terms, 0)
    >>> part.lag_sums[:, 0]  # sum y^2, sum y_t y_(t-1)
    array([14.,  8.])
    """
    data = np.asarray(block)
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float64)
    base = np.asarray(offset, dtype=np.float64).reshape(-1)
    n, n_vox = data.shape
    lags, p = terms.order + 1, terms.order
    design = terms.lag_design[:, start : start + n, :]  # (p + 1, n, P)
    flat = np.ascontiguousarray(design.transpose(0, 2, 1).reshape(-1, n))
    cross = np.empty((flat.shape[0], n_vox))
    lag_sums = np.empty((lags, n_vox))
    head, tail = np.empty((p, n_vox)), np.empty((p, n_vox))
    # voxel slabs small enough that the float64 copy stays in cache for all its uses
    width = max(256, _SLAB_BYTES // (8 * max(n, 1)))
    y = np.empty((n, min(width, n_vox)))
    for lo in range(0, n_vox, width):
        hi = min(lo + width, n_vox)
        slab = y[:, : hi - lo]
        np.subtract(data[:, lo:hi], base[lo:hi], out=slab, dtype=np.float64)
        serial_matmul(flat, slab, out=cross[:, lo:hi])
        for m in range(lags):
            np.einsum("tv,tv->v", slab[m:], slab[: n - m], out=lag_sums[m, lo:hi])
        head[:, lo:hi] = slab[:p]
        tail[:, lo:hi] = slab[n - p :]
    return Partial(cross=cross.reshape(lags, -1, n_vox), lag_sums=lag_sums, head=head, tail=tail)


def combine(parts: Sequence[Partial]) -> Partial:
    """Combine partial statistics of consecutive scan ranges, given in time order.

    Parameters
    ----------
    parts : sequence of Partial
        Adjacent ranges, earliest first; each covers at least p scans.

    Returns
    -------
    Partial
        The statistics of the union of the ranges.

    Examples
    --------
    >>> terms = DesignTerms.build(np.ones((4, 1)), order=1)
    >>> y = np.arange(4.0)[:, None]
    >>> halves = [chunk_statistics(y[i : i + 2], np.zeros(1), terms, i) for i in (0, 2)]
    >>> combine(halves).lag_sums[:, 0]
    array([14.,  8.])
    """
    cross = parts[0].cross.copy()
    lag_sums = parts[0].lag_sums.copy()
    tail = parts[0].tail
    order = tail.shape[0]
    for part in parts[1:]:
        cross += part.cross
        lag_sums += part.lag_sums
        for m in range(1, order + 1):
            lag_sums[m] += np.einsum("tv,tv->v", part.head[:m], tail[order - m :])
        tail = part.tail
    return Partial(cross=cross, lag_sums=lag_sums, head=parts[0].head, tail=tail)
