"""AR(p) noise: Yule–Walker estimation per voxel, exact whitening and its quadratic forms.

Whitening convention
--------------------
bigglm whitens with the *exact* inverse covariance of a stationary AR(p) process, the
generalisation of Prais–Winsten to order p. Writing ``a = (1, -phi_1, ..., -phi_p)``,
rows ``t > p`` of the whitened series are ``w_t = sum_k a_k y_(t-k)`` and the first p rows
are scaled by the Cholesky factor of their stationary covariance (for AR(1):
``w_1 = sqrt(1 - r^2) y_1``). The fit never forms the whitened series: GLS needs only the
quadratic form ``u' Q w`` with ``Q = A'A``, a banded matrix whose interior is Toeplitz,
``q_m = sum_k a_k a_(k+m)``, corrected in its two p x p corners. The bottom-right
correction removes the band terms that would reach past the last scan; the top-left one
is its mirror image, because the inverse of a symmetric Toeplitz matrix is persymmetric.
Whitened residuals, asked for explicitly, apply the filter itself (:func:`whiten`, with
:func:`whitening_head` for the first p rows).

Other conventions: nilearn keeps the first p rows partially differenced and unscaled
(``w_t = y_t - sum_(k<t) phi_k y_(t-k)``, no top correction) and bins AR(1) coefficients
to 0.01; statsmodels ``GLSAR`` drops the first p rows (Cochrane–Orcutt). The three agree
in the interior and differ only in how the first p scans are weighted.

The coefficients are Yule–Walker estimates from the OLS residual autocovariances with
the ``1 / (T - k)`` ("adjusted") normalisation that nilearn and statsmodels use; the
residuals are not re-centred (a design that spans the constant gives zero-mean
residuals already).

The AR(1) fast path (a design basis that turns every voxel's whitened Gram matrix into a
diagonal plus a rank-2 term) is :mod:`bigglm.glm.ar1`; the per-voxel solves of the
whitened normal equations are in :mod:`bigglm.glm.linalg`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from bigglm.glm.linalg import serial_matmul

__all__ = [
    "band_coefficients",
    "corner_correction",
    "is_stationary",
    "whiten",
    "whitened_cross",
    "whitened_energy",
    "whitened_gram",
    "whitened_gram_stack",
    "whitening_head",
    "yule_walker",
]

Array = NDArray[np.float64]


def yule_walker(acov: Array, n_scans: int) -> Array:
    """AR(p) coefficients per voxel from residual lag sums (Yule–Walker, adjusted).

    Parameters
    ----------
    acov : numpy.ndarray, shape (p + 1, n_voxels)
        ``sum_t e_t e_(t-k)`` for k = 0..p.
    n_scans : int
        Number of scans T; lag k is normalised by ``T - k``.

    Returns
    -------
    numpy.ndarray, shape (p, n_voxels)
        The coefficients ``phi_1..phi_p``; NaN where the residual variance is zero.

    Examples
    --------
    >>> e = np.array([1.0, 0.5, -0.2, 0.3, -1.0])
    >>> acov = np.array([[e @ e], [e[1:] @ e[:-1]]])
    >>> yule_walker(acov, 5).round(4)
    array([[0.021]])
    """
    order = acov.shape[0] - 1
    r = acov / (n_scans - np.arange(order + 1))[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        if order == 1:
            return r[1:] / r[0]
        lags = np.abs(np.subtract.outer(np.arange(order), np.arange(order)))
        toeplitz = np.moveaxis(r[lags], -1, 0)  # (v, p, p)
        ok = r[0] > 0
        phi = np.full((acov.shape[1], order), np.nan)
        phi[ok] = np.linalg.solve(toeplitz[ok], r[1:, ok].T[..., None])[..., 0]
    return phi.T


def is_stationary(phi: Array) -> NDArray[np.bool_]:
    """Whether each voxel's AR(p) coefficients define a stationary process.

    Parameters
    ----------
    phi : numpy.ndarray, shape (p, n_voxels)

    Returns
    -------
    numpy.ndarray of bool, shape (n_voxels,)
        True where every root of the companion matrix lies inside the unit circle.

    Examples
    --------
    >>> is_stationary(np.array([[0.5, 1.2, np.nan]]))
    array([ True, False, False])
    """
    order, n = phi.shape
    finite = np.all(np.isfinite(phi), axis=0)
    if order == 1:
        return finite & (np.abs(np.nan_to_num(phi[0], nan=2.0)) < 1.0)
    companion = np.zeros((n, order, order))
    companion[:, 0, :] = np.nan_to_num(phi.T, nan=2.0)
    companion[:, np.arange(1, order), np.arange(order - 1)] = 1.0
    radius = np.abs(np.linalg.eigvals(companion)).max(axis=-1)
    return finite & (radius < 1.0)


def whitening_head(phi: Array) -> Array:
    """The first p rows of the whitening filter: ``inv(cholesky(Gamma_p))`` per voxel.

    ``Gamma_p`` is the p x p autocovariance of the stationary AR(p) process with unit
    innovation variance, so ``W = inv(cholesky(Gamma_T))`` (``W'W`` the exact inverse
    covariance) has this lower-triangular block in its first p rows; its later rows are
    the filter ``(1, -phi_1, ..., -phi_p)``.

    Parameters
    ----------
    phi : numpy.ndarray, shape (p, n_voxels)
        Stationary coefficients (NaN is read as 0: white noise).

    Returns
    -------
    numpy.ndarray, shape (n_voxels, p, p)
        Lower triangular.

    Examples
    --------
    >>> whitening_head(np.array([[0.6]]))  # Prais-Winsten: sqrt(1 - 0.36)
    array([[[0.8]]])
    """
    order, n = phi.shape
    phi = np.nan_to_num(phi)
    # gamma_k - sum_j phi_j gamma_|k-j| = [k == 0] for k = 0..p, solved per voxel
    system = np.broadcast_to(np.eye(order + 1), (n, order + 1, order + 1)).copy()
    for k in range(order + 1):
        for j in range(1, order + 1):
            system[:, k, abs(k - j)] -= phi[j - 1]
    rhs = np.zeros((n, order + 1, 1))
    rhs[:, 0] = 1.0
    gamma = np.linalg.solve(system, rhs)[..., 0]
    lags = np.abs(np.subtract.outer(np.arange(order), np.arange(order)))
    factor = np.linalg.cholesky(gamma[:, lags])
    return np.linalg.inv(factor)


def whiten(rows: Array, phi: Array, start: int, head: Array | None = None) -> Array:
    """Apply the exact AR(p) whitening filter to consecutive rows of a series.

    Parameters
    ----------
    rows : numpy.ndarray, shape (k + n, n_voxels)
        Scans ``start - k .. start + n - 1`` of the series, with ``k = min(p, start)``
        rows of context before the ``n`` rows to whiten (a block of a longer series
        needs only the p scans before it).
    phi : numpy.ndarray, shape (p, n_voxels)
        Stationary coefficients (NaN is read as 0).
    start : int
        The scan of the first row to whiten.
    head : numpy.ndarray, shape (n_voxels, p, p), optional
        :func:`whitening_head` of ``phi``, if already known (used when ``start < p``).

    Returns
    -------
    numpy.ndarray, shape (n, n_voxels)
        Whitened scans ``start .. start + n - 1``: for scan ``t >= p``,
        ``w_t = y_t - sum_k phi_k y_(t-k)``; the first p scans are ``head @ y[:p]``.

    Examples
    --------
    Whitening a series in two blocks gives the whitened series:

    >>> y, phi = np.array([[1.0], [2.0], [4.0], [3.0]]), np.array([[0.6]])
    >>> whiten(y, phi, 0).ravel()
    array([0.8, 1.4, 2.8, 0.6])
    >>> whiten(y[1:], phi, 2).ravel()  # scans 2..3, with scan 1 as context
    array([2.8, 0.6])
    """
    order = phi.shape[0]
    context = min(order, start)
    n = rows.shape[0] - context
    phi = np.nan_to_num(phi)
    out = np.array(rows[context:], dtype=np.float64)
    skip = min(n, max(0, order - start))  # rows before scan p: done by the head below
    for lag in range(1, order + 1):
        out[skip:] -= phi[lag - 1] * rows[context + skip - lag : context + n - lag]
    if skip:
        factor = whitening_head(phi) if head is None else head
        for t in range(start, start + skip):
            out[t - start] = np.einsum("vs,sv->v", factor[:, t, : t + 1], rows[: t + 1])
    return out


def band_coefficients(phi: Array) -> Array:
    """Interior band of ``Q = A'A``: ``q_m = sum_k a_k a_(k+m)``, ``a = (1, -phi)``.

    Parameters
    ----------
    phi : numpy.ndarray, shape (p, n_voxels)

    Returns
    -------
    numpy.ndarray, shape (p + 1, n_voxels)
        ``q_0..q_p`` per voxel.

    Examples
    --------
    >>> band_coefficients(np.array([[0.5]]))
    array([[ 1.25],
           [-0.5 ]])
    """
    a = np.concatenate([np.ones((1, phi.shape[1])), -phi])
    order = phi.shape[0]
    return np.stack([(a[: order + 1 - m] * a[m:]).sum(axis=0) for m in range(order + 1)])


def corner_correction(phi: Array) -> tuple[Array, Array]:
    """The p x p corrections of ``Q`` at its top-left and bottom-right corners.

    Parameters
    ----------
    phi : numpy.ndarray, shape (p, n_voxels)

    Returns
    -------
    top, bottom : numpy.ndarray, shape (n_voxels, p, p)
        Added to the Toeplitz band on the first p and the last p scans.

    Examples
    --------
    >>> top, bottom = corner_correction(np.array([[0.5]]))
    >>> float(top[0, 0, 0]), float(bottom[0, 0, 0])
    (-0.25, -0.25)
    """
    order, n = phi.shape
    a = np.concatenate([np.ones((1, n)), -phi])  # (p + 1, v)
    i, j = np.meshgrid(np.arange(order), np.arange(order), indexing="ij")
    lag = i + order - j  # tail window i reaches scan T - p + j with lag i + p - j
    past_end = np.where((j >= i)[None], a[np.clip(lag, 0, order)].transpose(2, 0, 1), 0.0)
    bottom = -np.einsum("vki,vkj->vij", past_end, past_end)
    top = bottom[:, ::-1, ::-1]
    return top, bottom


def whitened_gram(
    band: Array, top: Array, bottom: Array, lag_gram: Array, x_head: Array, x_tail: Array
) -> Array:
    """``X' Q X`` per voxel, from the design's symmetrised lag Gram matrices.

    Parameters
    ----------
    band : numpy.ndarray, shape (p + 1, v)
        ``q_m`` from :func:`band_coefficients`.
    top, bottom : numpy.ndarray, shape (v, p, p)
        From :func:`corner_correction`.
    lag_gram : numpy.ndarray, shape (p + 1, P, P)
        ``X'X`` for m = 0 and ``X'(L^m + F^m)X`` for m >= 1.
    x_head, x_tail : numpy.ndarray, shape (p, P)
        The first and the last p rows of X.

    Returns
    -------
    numpy.ndarray, shape (v, P, P)

    Examples
    --------
    >>> x = np.ones((4, 1))
    >>> phi = np.zeros((1, 1))  # white noise: Q is the identity
    >>> grams = np.array([x.T @ x, 2 * x[1:].T @ x[:-1]])
    >>> top, bottom = corner_correction(phi)
    >>> whitened_gram(band_coefficients(phi), top, bottom, grams, x[:1], x[-1:])
    array([[[4.]]])
    """
    n_reg, n_vox = lag_gram.shape[-1], band.shape[1]
    # X'QX is linear in (q_m, corner entries) with shared P x P matrices: one BLAS product
    weights = np.concatenate([band.T, top.reshape(n_vox, -1), bottom.reshape(n_vox, -1)], axis=1)
    shared = _gram_terms(lag_gram, x_head, x_tail)
    return (weights @ shared).reshape(n_vox, n_reg, n_reg)


def whitened_gram_stack(
    band: Array, top: Array, bottom: Array, lag_gram: Array, x_head: Array, x_tail: Array
) -> Array:
    """:func:`whitened_gram` with the voxel axis last, ``(P, P, v)``.

    The layout :func:`~bigglm.glm.linalg.cholesky_solve` takes: the same linear
    combination of shared P x P matrices, as a product whose wide dimension is the voxels
    (:func:`~bigglm.glm.linalg.serial_matmul`: no BLAS threads).

    Examples
    --------
    >>> x = np.column_stack([np.arange(4.0), np.ones(4)])
    >>> phi = np.array([[0.3, -0.2]])
    >>> grams = np.array([x.T @ x, x[1:].T @ x[:-1] + x[:-1].T @ x[1:]])
    >>> args = (band_coefficients(phi), *corner_correction(phi), grams, x[:1], x[-1:])
    >>> bool(np.allclose(whitened_gram_stack(*args), whitened_gram(*args).transpose(1, 2, 0)))
    True
    """
    n_reg, n_vox = lag_gram.shape[-1], band.shape[1]
    weights = np.concatenate([band, top.reshape(n_vox, -1).T, bottom.reshape(n_vox, -1).T])
    shared = _gram_terms(lag_gram, x_head, x_tail)
    return serial_matmul(np.ascontiguousarray(shared.T), weights).reshape(n_reg, n_reg, n_vox)


def _gram_terms(lag_gram: Array, x_head: Array, x_tail: Array) -> Array:
    """The P x P matrices that ``X'QX`` combines, one a row: lags, then head and tail pairs.

    Row ``m`` (m = 0..p) is ``lag_gram[m]``; then, for each corner entry ``(i, j)``, the
    outer product of the design's rows i and j at the head, and likewise at the tail.

    Examples
    --------
    >>> _gram_terms(np.ones((2, 1, 1)), np.ones((1, 1)), 2 * np.ones((1, 1))).ravel()
    array([1., 1., 1., 4.])
    """
    n_reg = lag_gram.shape[-1]
    return np.concatenate(
        [
            lag_gram.reshape(lag_gram.shape[0], -1),
            np.einsum("ia,jb->ijab", x_head, x_head).reshape(-1, n_reg * n_reg),
            np.einsum("ia,jb->ijab", x_tail, x_tail).reshape(-1, n_reg * n_reg),
        ]
    )


def whitened_cross(
    band: Array,
    top: Array,
    bottom: Array,
    lag_cross: Array,
    heads: tuple[Array, Array],
    tails: tuple[Array, Array],
) -> Array:
    """``X' Q Y`` per voxel, from the symmetrised lagged cross products.

    Parameters
    ----------
    band, top, bottom : numpy.ndarray
        As for :func:`whitened_gram`.
    lag_cross : numpy.ndarray, shape (p + 1, P, v)
        ``X'Y`` for m = 0 and ``((L^m + F^m) X)' Y`` for m >= 1.
    heads, tails : pair of numpy.ndarray
        ``(X rows (p, P), Y rows (p, v))`` for the first and the last p scans.

    Returns
    -------
    numpy.ndarray, shape (P, v)

    Examples
    --------
    >>> phi = np.zeros((1, 1))
    >>> top, bottom = corner_correction(phi)
    >>> cross = np.array([[[3.0]], [[0.0]]])
    >>> rows = (np.ones((1, 1)), np.ones((1, 1)))
    >>> whitened_cross(band_coefficients(phi), top, bottom, cross, rows, rows)
    array([[3.]])
    """
    out = np.einsum("mv,mav->av", band, lag_cross)
    for corner, (x_rows, y_rows) in ((top, heads), (bottom, tails)):
        out += serial_matmul(x_rows.T, np.einsum("vij,jv->iv", corner, y_rows))
    return out


def whitened_energy(
    band: Array, top: Array, bottom: Array, lag_sums: Array, head: Array, tail: Array
) -> Array:
    """``Y' Q Y`` per voxel, from the data's lag sums.

    Parameters
    ----------
    band, top, bottom : numpy.ndarray
        As for :func:`whitened_gram`.
    lag_sums : numpy.ndarray, shape (p + 1, v)
        ``sum_t y_t y_(t-m)`` for m = 0..p.
    head, tail : numpy.ndarray, shape (p, v)
        The first and the last p rows of Y.

    Returns
    -------
    numpy.ndarray, shape (v,)

    Examples
    --------
    >>> phi = np.array([[0.5]])
    >>> y = np.array([1.0, 2.0, 3.0])
    >>> sums = np.array([[y @ y], [y[1:] @ y[:-1]]])
    >>> top, bottom = corner_correction(phi)
    >>> e = whitened_energy(band_coefficients(phi), top, bottom, sums, y[:1, None], y[-1:, None])
    >>> w = np.array([np.sqrt(0.75) * 1.0, 2.0 - 0.5, 3.0 - 1.0])  # Prais-Winsten
    >>> bool(np.isclose(e[0], w @ w))
    True
    """
    weights = band * np.where(np.arange(band.shape[0]) > 0, 2.0, 1.0)[:, None]
    out = (weights * lag_sums).sum(axis=0)
    out += np.einsum("iv,vij,jv->v", head, top, head)
    out += np.einsum("iv,vij,jv->v", tail, bottom, tail)
    return out
