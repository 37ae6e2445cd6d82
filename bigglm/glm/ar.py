"""AR(p) noise: Yule–Walker coefficients and exact whitened quadratic forms.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from bigglm.glm.linalg import serial_matmul

__all__ = [
    "Ar1Basis",
    "ar1_inverse_form",
    "ar1_solve",
    "ar1_solve_rotated",
    "band_coefficients",
    "cholesky_solve",
    "corner_correction",
    "is_stationary",
    "solve_psd",
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
    shared = np.concatenate(
        [
            lag_gram.reshape(band.shape[0], -1),
            np.einsum("ia,jb->ijab", x_head, x_head).reshape(-1, n_reg * n_reg),
            np.einsum("ia,jb->ijab", x_tail, x_tail).reshape(-1, n_reg * n_reg),
        ]
    )
    return (weights @ shared).reshape(n_vox, n_reg, n_reg)


def whitened_gram_stack(
    band: Array, top: Array, bottom: Array, lag_gram: Array, x_head: Array, x_tail: Array
) -> Array:
    """:func:`whitened_gram` with the voxel axis last, ``(P, P, v)``, for :func:`cholesky_solve`.

    The same linear combination of shared P x P matrices, as a product whose wide
    dimension is the voxels (:func:`~bigglm.glm.linalg.serial_matmul`: no BLAS threads).

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
    shared = np.concatenate(
        [
            lag_gram.reshape(band.shape[0], -1),
            np.einsum("ia,jb->ijab", x_head, x_head).reshape(-1, n_reg * n_reg),
            np.einsum("ia,jb->ijab", x_tail, x_tail).reshape(-1, n_reg * n_reg),
        ]
    )
    return serial_matmul(np.ascontiguousarray(shared.T), weights).reshape(n_reg, n_reg, n_vox)


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


@dataclass(frozen=True)
class Ar1Basis:
    """A basis of the design's row space that makes every AR(1) whitened Gram simple.

    For AR(1) the exact (Prais–Winsten) ``Q`` is ``(1 + r^2) I - r S - r^2 (e_1 e_1' +
    e_T e_T')`` with ``S = L + F``, so ``X'QX`` is a quadratic polynomial in r with fixed
    P x P matrices. With ``X = U s V'`` (rank-r SVD) and ``U'SU = E diag(lam) E'``, the
    matrix ``K = V s^-1 E`` (P x r) gives ``K'X'QXK = diag(1 + r^2 - r lam) - r^2 W W'``
    where ``W`` (r x 2) holds the first and last rows of the orthonormal basis ``UE``:
    a diagonal plus a rank-2 term, inverted per voxel in O(r) by Woodbury instead of a
    P x P factorisation. ``(X'QX)^+ = K (K'X'QXK)^-1 K'`` is the Moore–Penrose inverse
    also for a rank-deficient X (K spans its row space), so the betas are minimum-norm.

    Attributes
    ----------
    transform : numpy.ndarray, shape (P, r)
        ``K``.
    eigenvalues : numpy.ndarray, shape (r,)
        ``lam``, the eigenvalues of ``U'SU`` (in (-2, 2)).
    corners : numpy.ndarray, shape (r, 2)
        ``W``.

    Examples
    --------
    >>> x = np.column_stack([np.arange(6.0), np.ones(6)])
    >>> basis = Ar1Basis.build(x, rank=2)
    >>> k = basis.transform
    >>> bool(np.allclose(k.T @ x.T @ x @ k, np.eye(2)))
    True
    """

    transform: Array
    eigenvalues: Array
    corners: Array

    @classmethod
    def build(
        cls,
        matrix: Array,
        rank: int,
        svd: tuple[Array, Array, Array] | None = None,
    ) -> Ar1Basis:
        """The basis of a design of known rank (``svd``: its thin SVD, if already known).

        Parameters
        ----------
        matrix : numpy.ndarray, shape (T, P)
        rank : int
        svd : tuple of numpy.ndarray, optional
            ``numpy.linalg.svd(matrix, full_matrices=False)``.

        Returns
        -------
        Ar1Basis
        """
        u, s, vt = svd if svd is not None else np.linalg.svd(matrix, full_matrices=False)
        u_r = u[:, :rank]
        lag = u_r[1:].T @ u_r[:-1]  # U'LU
        lam, vectors = np.linalg.eigh(lag + lag.T)
        transform = (vt[:rank].T / s[:rank]) @ vectors
        corners = (u_r[[0, -1]] @ vectors).T
        return cls(transform=transform, eigenvalues=lam, corners=corners)


#: Voxels whose 2 x 2 Woodbury system is this close to singular (``det / (c00 c11)``;
#: only for a coefficient a hair below 1, about 1 - 1e-6 for a design with a constant
#: and T = 80) are solved by the general P x P path instead.
_WOODBURY_MIN_RATIO = 1e-4


def _ar1_parts(
    basis: Ar1Basis, phi: Array
) -> tuple[Array, Array, Array, Array, Array, NDArray[np.bool_]]:
    """Per voxel ``1 / diag`` (r, v), the 2 x 2 Woodbury matrix entries and the usable mask."""
    # 1 + r^2 - r lam >= (1 - |r|)^2 > 0 for every r: lam lies strictly inside (-2, 2)
    inv_d = np.multiply(basis.eigenvalues[:, None], -phi)
    inv_d += 1.0 + phi**2
    np.reciprocal(inv_d, out=inv_d)
    w = basis.corners
    pairs = np.stack([w[:, 0] * w[:, 0], w[:, 0] * w[:, 1], w[:, 1] * w[:, 1]])
    m = serial_matmul(pairs, inv_d)
    f = phi**2
    c00, c01, c11 = 1.0 - f * m[0], -f * m[1], 1.0 - f * m[2]
    det = c00 * c11 - c01 * c01
    ok = (c00 > 0) & (c11 > 0) & (det > _WOODBURY_MIN_RATIO * c00 * c11)
    return inv_d, c00, c01, c11, det, ok


def ar1_solve(basis: Ar1Basis, phi: Array, rhs: Array) -> tuple[Array, NDArray[np.bool_]]:
    """``(X'QX)^+ rhs`` per voxel for AR(1) coefficients ``phi``, in O(P^2) per voxel.

    Parameters
    ----------
    basis : Ar1Basis
    phi : numpy.ndarray, shape (v,)
        Finite coefficients with ``|phi| < 1``.
    rhs : numpy.ndarray, shape (P, v)

    Returns
    -------
    solution : numpy.ndarray, shape (P, v)
    ok : numpy.ndarray of bool, shape (v,)
        False where the rank-2 correction is too close to singular for a safe solve
        (``phi`` a hair below 1): solve those voxels with :func:`solve_psd`.

    Examples
    --------
    >>> x = np.column_stack([np.arange(6.0), np.ones(6)])
    >>> phi = np.array([0.5])
    >>> top, bottom = corner_correction(phi[None])
    >>> grams = np.stack([x.T @ x, x[1:].T @ x[:-1] + x[:-1].T @ x[1:]])
    >>> gram = whitened_gram(band_coefficients(phi[None]), top, bottom, grams, x[:1], x[-1:])
    >>> b, ok = ar1_solve(Ar1Basis.build(x, 2), phi, np.ones((2, 1)))
    >>> bool(np.allclose(gram[0] @ b[:, 0], 1.0)), ok
    (True, array([ True]))
    """
    rotated = serial_matmul(basis.transform.T, rhs)
    inner, ok = ar1_solve_rotated(basis, phi, rotated)
    return serial_matmul(basis.transform, inner), ok


def ar1_solve_rotated(
    basis: Ar1Basis, phi: Array, rotated: Array
) -> tuple[Array, NDArray[np.bool_]]:
    """:func:`ar1_solve` in the basis's coordinates: ``(K'X'QXK)^-1 rotated``.

    With ``rotated = K' rhs`` the solution of :func:`ar1_solve` is ``K`` times this.

    Parameters
    ----------
    basis : Ar1Basis
    phi : numpy.ndarray, shape (v,)
    rotated : numpy.ndarray, shape (r, v)

    Returns
    -------
    solution : numpy.ndarray, shape (r, v)
    ok : numpy.ndarray of bool, shape (v,)
        As for :func:`ar1_solve`.
    """
    inv_d, c00, c01, c11, det, ok = _ar1_parts(basis, phi)
    w = basis.corners
    t0, t1 = serial_matmul(w.T, rotated * inv_d)
    f = phi**2
    with np.errstate(divide="ignore", invalid="ignore"):
        f_det = f / det
    # H^-1 s = (s + r^2 W C^-1 W' D^-1 s) / d, with the 2 x 2 C^-1 written out
    coef = np.stack([(c11 * t0 - c01 * t1) * f_det, (c00 * t1 - c01 * t0) * f_det])
    inner = serial_matmul(w, coef)
    inner += rotated
    inner *= inv_d
    return inner, ok


def ar1_inverse_form(
    basis: Ar1Basis, phi: Array, contrast: Array
) -> tuple[Array, NDArray[np.bool_]]:
    """``C (X'QX)^+ C'`` per voxel for AR(1) coefficients ``phi``, in O(P q^2) per voxel.

    Parameters
    ----------
    basis : Ar1Basis
    phi : numpy.ndarray, shape (v,)
    contrast : numpy.ndarray, shape (q, P)
        Rows in the design's row space (estimable).

    Returns
    -------
    form : numpy.ndarray, shape (q, q, v)
    ok : numpy.ndarray of bool, shape (v,)
        As for :func:`ar1_solve`.

    Examples
    --------
    >>> basis = Ar1Basis.build(np.ones((6, 1)), rank=1)
    >>> ar1_inverse_form(basis, np.zeros(1), np.ones((1, 1)))[0]  # white noise: 1 / T
    array([[[0.16666667]]])
    """
    inv_d, c00, c01, c11, det, ok = _ar1_parts(basis, phi)
    g = basis.transform.T @ contrast.T  # (r, q)
    w = basis.corners
    q = g.shape[1]
    outer = np.einsum("ia,ib->abi", g, g).reshape(q * q, -1)
    form = serial_matmul(outer, inv_d).reshape(q, q, -1)
    t0 = serial_matmul((g * w[:, :1]).T, inv_d)  # (q, v)
    t1 = serial_matmul((g * w[:, 1:]).T, inv_d)
    f = phi**2
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = f / det
    form += scale * (
        c11 * t0[:, None] * t0[None]
        - c01 * (t0[:, None] * t1[None] + t1[:, None] * t0[None])
        + c00 * t1[:, None] * t1[None]
    )
    return form, ok
