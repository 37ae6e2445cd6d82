"""The AR(1) fast path: every voxel's GLS solve in O(P^2) from one basis of the design.

For AR(1) noise the exact (Prais–Winsten) whitened Gram matrix ``X'QX`` of every voxel is
a quadratic polynomial in its coefficient with fixed P x P matrices. One basis of the
design's row space, built once per run (:class:`Ar1Basis`), makes each of them a diagonal
plus a rank-2 term, so a voxel's betas (:func:`ar1_solve`, :func:`ar1_solve_rotated`) and
its contrast variances (:func:`ar1_inverse_form`) follow by Woodbury's identity instead
of a P x P factorisation per voxel. Voxels whose 2 x 2 Woodbury system is too close to
singular are flagged for the general path (:func:`bigglm.glm.linalg.solve_psd` on the
whitened Gram of :mod:`bigglm.glm.ar`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from bigglm.glm.linalg import serial_matmul

__all__ = ["Ar1Basis", "ar1_inverse_form", "ar1_solve", "ar1_solve_rotated"]

Array = NDArray[np.float64]


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
        (``phi`` a hair below 1): solve those voxels with
        :func:`~bigglm.glm.linalg.solve_psd`.

    Examples
    --------
    >>> from bigglm.glm.ar import band_coefficients, corner_correction, whitened_gram
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
