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

from bigglm.glm.ar1 import Ar1Basis
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
    probes : numpy.ndarray, shape (R, T)
        The series every chunk multiplies the data by: the P columns of X, then the
        lagged columns that are not derived (below). ``R = P`` for OLS.
    lag_map : numpy.ndarray, shape ((p + 1) * P, R + 2p)
        How the lagged cross products ``lag_design[m]' Y`` follow from the probe
        products and the first and last p rows of Y. A lagged column that is a
        combination of the columns of X plus terms on the first and last p scans
        (drifts and the constant are: ``(L + F) cos(w t)`` is ``2 cos(w) cos(w t)``
        away from the ends) is derived through this map and never multiplied by the
        data; the others are probes, mapped by the identity.
    ar1 : Ar1Basis or None
        For AR(1) noise, the basis in which every voxel's whitened Gram is a diagonal
        plus a rank-2 term (:class:`~bigglm.glm.ar1.Ar1Basis`); None otherwise.
    residual_dof : float or None
        The divisor of the residual sum of squares when it is not ``T - rank``.

    Examples
    --------
    >>> terms = DesignTerms.build(np.ones((4, 1)), order=1)
    >>> terms.lag_design[1, :, 0]
    array([1., 2., 2., 1.])
    >>> terms.probes.shape  # (L + F) 1 = 2 - first - last: derived, not a probe
    (1, 4)
    """

    matrix: Array
    order: int
    lag_design: Array
    lag_gram: Array
    rank: int
    gram_pinv: Array
    constant_fit: Array | None
    probes: Array
    lag_map: Array
    ar1: Ar1Basis | None = None
    residual_dof: float | None = None

    @property
    def variance_dof(self) -> float:
        """What the residual sum of squares is divided by: ``T - rank`` unless a noise
        model sets its own (SPM's ``trRV`` for ``noise="spm-ar1"``)."""
        if self.residual_dof is not None:
            return self.residual_dof
        return float(self.matrix.shape[0] - self.rank)

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
        tol = (float(np.max(s)) if s.size else 0.0) * max(x.shape) * np.finfo(np.float64).eps
        rank = int((s > tol).sum())
        v_r = vt[:rank].T / s[:rank]
        pinv = v_r @ u[:, :rank].T
        ones = np.ones(x.shape[0])
        fit = pinv @ ones
        spans = np.allclose(x @ fit, ones, rtol=0.0, atol=1e-8)
        probes, lag_map = _probes(x, lag_design)
        return cls(
            matrix=x,
            order=order,
            lag_design=lag_design,
            lag_gram=np.einsum("ta,mtb->mab", x, lag_design),
            rank=rank,
            gram_pinv=v_r @ v_r.T,
            constant_fit=fit if spans else None,
            probes=probes,
            lag_map=lag_map,
            ar1=Ar1Basis.build(x, rank, (u, s, vt)) if order == 1 else None,
        )

    def lag_cross(self, total: Partial, combination: Array | None = None) -> Array:
        """``lag_design[m]' Y`` for m = 0..p, from a run's statistics.

        Parameters
        ----------
        total : Partial
            Statistics of the whole run (its ``head`` and ``tail`` are the run's first
            and last p rows).
        combination : numpy.ndarray, shape (k, (p + 1) * P), optional
            Return these k combinations of the stacked lagged cross products instead
            (one product with the combined map, not two).

        Returns
        -------
        numpy.ndarray, shape (p + 1, P, v), or (k, v) with ``combination``

        Examples
        --------
        >>> terms = DesignTerms.build(np.column_stack([np.arange(5.0), np.ones(5)]), 1)
        >>> y = np.array([[1.0], [4.0], [2.0], [0.0], [3.0]])
        >>> derived = terms.lag_cross(chunk_statistics(y, np.zeros(1), terms, 0))
        >>> bool(np.allclose(derived, np.einsum("mta,tv->mav", terms.lag_design, y)))
        True
        """
        n_reg = self.matrix.shape[1]
        if self.order == 0 and combination is None:
            return total.cross.reshape(1, n_reg, -1)
        known = np.concatenate([total.cross, total.head, total.tail])
        if combination is not None:
            return serial_matmul(combination @ self.lag_map, known)
        return serial_matmul(self.lag_map, known).reshape(self.order + 1, n_reg, -1)


#: A lagged design column is derived from X when its least-squares residual on X and
#: the edge scans is below this fraction of its norm. Exact relations (cosines,
#: polynomials, the constant) leave ~1e-15; a column that fails is simply a probe, so
#: the threshold trades speed only, never accuracy.
_DERIVED_RESIDUAL = 1e-12


def _probes(x: Array, lag_design: Array) -> tuple[Array, Array]:
    """The probe series (R, T) and the lag map ((p + 1) P, R + 2p) of :class:`DesignTerms`.

    The map's columns follow :meth:`DesignTerms.lag_cross`'s stacking: the R probe
    products, then the first p rows of Y, then the last p rows.

    Examples
    --------
    >>> x = np.column_stack([np.ones(6), [0.0, 1, 1, 0, 0, 0]])
    >>> probes, lag_map = _probes(x, np.stack([x, _shift(x, 1) + _shift(x, -1)]))
    >>> probes.shape, lag_map.shape  # X, plus the lagged task column: 3 probes
    ((3, 6), (4, 5))
    """
    n_scans, n_reg = x.shape
    order = lag_design.shape[0] - 1
    if order == 0:
        return np.ascontiguousarray(x.T), np.eye(n_reg)
    edges = np.zeros((n_scans, 2 * order))
    edges[np.arange(order), np.arange(order)] = 1.0
    edges[n_scans - order + np.arange(order), order + np.arange(order)] = 1.0
    basis = np.hstack([x, edges])
    # rows: (m, column) of the lagged cross products; columns: X, extra probes, edges
    from_x = np.zeros((order + 1, n_reg, n_reg))
    from_x[0] = np.eye(n_reg)
    from_edges = np.zeros((order + 1, n_reg, 2 * order))
    extra: list[tuple[int, int]] = []
    for m in range(1, order + 1):
        coef = np.linalg.lstsq(basis, lag_design[m], rcond=None)[0]
        residual = np.linalg.norm(basis @ coef - lag_design[m], axis=0)
        derived = residual <= _DERIVED_RESIDUAL * np.linalg.norm(lag_design[m], axis=0)
        from_x[m, derived] = coef[:n_reg, derived].T
        from_edges[m, derived] = coef[n_reg:, derived].T
        extra += [(m, int(a)) for a in np.flatnonzero(~derived)]
    from_extra = np.zeros((order + 1, n_reg, len(extra)))
    for index, (m, a) in enumerate(extra):
        from_extra[m, a, index] = 1.0
    lag_map = np.concatenate([from_x, from_extra, from_edges], axis=-1)
    probes = np.vstack([x.T, *(lag_design[m][:, a] for m, a in extra)])
    return probes, lag_map.reshape((order + 1) * n_reg, -1)


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
    cross : numpy.ndarray, shape (R, v)
        ``probes Y`` summed over the scans (:meth:`DesignTerms.lag_cross` turns the
        run's total into every lagged cross product).
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
    flat = np.ascontiguousarray(terms.probes[:, start : start + n])
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
    return Partial(cross=cross, lag_sums=lag_sums, head=head, tail=tail)


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
