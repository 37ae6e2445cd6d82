"""Per-voxel normal equations of group models, vectorised over a block of voxels.

At the group level every voxel has its own set of subjects (a subject missing at a voxel
has weight 0 there) and, for mixed effects, its own weights, so every voxel has its own
information matrix ``X' W_v X``. These kernels form and invert those small ``P x P``
matrices for a whole block of voxels at once, voxel axis last, from matrix products: the
``P * P`` row-wise outer products of the design times the ``(n, v)`` weights is one GEMM.

Ranks are decided per voxel on the diagonally equilibrated matrix (so a column's scale
does not decide whether it counts), and the inverse is the Moore–Penrose one of the
unscaled matrix from its ``rank`` largest eigenpairs, as :func:`numpy.linalg.pinv` would
give for a design whose dropped directions are exactly null.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["RANK_TOLERANCE", "estimable", "outer_rows", "pinv_and_rank", "weighted_grams"]

Array = NDArray[np.float64]

#: Eigenvalues of the equilibrated ``X' W X`` below this fraction of the largest count as
#: zero (singular values of the equilibrated design below about 1e-5 of the largest).
RANK_TOLERANCE = 1e-10


def outer_rows(design: Array) -> Array:
    """Row-wise outer products of the design, ``(n, P * P)``: row i is ``vec(x_i x_i')``.

    Examples
    --------
    >>> outer_rows(np.array([[1.0, 2.0]]))
    array([[1., 2., 2., 4.]])
    """
    n, p = design.shape
    return np.einsum("ip,iq->ipq", design, design).reshape(n, p * p)


def weighted_grams(weights: Array, outer: Array) -> Array:
    """``X' diag(w_v) X`` for every voxel: ``(P, P, v)`` from weights ``(n, v)``.

    Parameters
    ----------
    weights : numpy.ndarray, shape (n, v)
        Per subject and voxel: 1/0 for present/missing (OLS), ``m / (tau2 + s)`` (mixed).
    outer : numpy.ndarray, shape (n, P * P)
        :func:`outer_rows` of the design.

    Returns
    -------
    numpy.ndarray, shape (P, P, v)

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    >>> m = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    >>> g = weighted_grams(m, outer_rows(x))
    >>> g[:, :, 1]  # voxel 1 lacks subject 1
    array([[2., 2.],
           [2., 4.]])
    """
    p = round(np.sqrt(outer.shape[1]))
    return (outer.T @ weights).reshape(p, p, weights.shape[1])


def pinv_and_rank(
    gram: Array, tolerance: float = RANK_TOLERANCE
) -> tuple[Array, NDArray[np.int64]]:
    """Moore–Penrose inverse and rank of each voxel's ``P x P`` PSD matrix.

    Parameters
    ----------
    gram : numpy.ndarray, shape (P, P, v)
    tolerance : float
        Relative eigenvalue cut of the equilibrated matrix (:data:`RANK_TOLERANCE`).

    Returns
    -------
    pinv : numpy.ndarray, shape (P, P, v)
    rank : numpy.ndarray of int, shape (v,)
        0 for an all-zero matrix (a voxel no subject covers); its pinv is 0.

    Examples
    --------
    >>> g = np.stack([np.diag([4.0, 1.0]), np.diag([4.0, 0.0])], axis=-1)
    >>> inv, rank = pinv_and_rank(g)
    >>> inv[:, :, 1], rank
    (array([[0.25, 0.  ],
           [0.  , 0.  ]]), array([2, 1]))
    """
    stack = np.ascontiguousarray(gram.transpose(2, 0, 1))
    p = stack.shape[-1]
    rank = _ranks(stack, tolerance)
    values, vectors = np.linalg.eigh(stack)
    keep = np.arange(p)[None, :] >= (p - rank)[:, None]
    with np.errstate(divide="ignore"):
        inverse_values = np.where(keep, 1.0 / np.where(keep, values, 1.0), 0.0)
    inverse = np.einsum("vik,vk,vjk->ijv", vectors, inverse_values, vectors)
    return inverse, rank


def _ranks(stack: Array, tolerance: float) -> NDArray[np.int64]:
    """Rank of each matrix of a ``(v, P, P)`` stack, from its equilibrated eigenvalues."""
    diagonal = np.einsum("vii->vi", stack)
    scale = np.sqrt(np.where(diagonal > 0, diagonal, 1.0))
    scaled = stack / scale[:, :, None] / scale[:, None, :]  # PSD: a zero diagonal, a zero row
    values = np.linalg.eigvalsh(scaled)
    top = values[:, -1:]
    return np.asarray(np.sum(values > tolerance * np.maximum(top, 1e-300), axis=1), dtype=np.int64)


def estimable(contrast: Array, gram: Array, inverse: Array) -> NDArray[np.bool_]:
    """Whether each row of ``contrast`` is estimable at each voxel: ``C G^+ G = C``.

    Parameters
    ----------
    contrast : numpy.ndarray, shape (q, P)
    gram, inverse : numpy.ndarray, shape (P, P, v)
        A voxel's ``X' W X`` and its pseudo-inverse (:func:`pinv_and_rank`).

    Returns
    -------
    numpy.ndarray of bool, shape (v,)
        True where every row lies in the row space of the voxel's design.

    Examples
    --------
    >>> g = np.stack([np.eye(2), np.diag([1.0, 0.0])], axis=-1)
    >>> inv, _ = pinv_and_rank(g)
    >>> estimable(np.array([[0.0, 1.0]]), g, inv)
    array([ True, False])
    """
    projected = np.einsum("qi,ijv,jkv->qkv", contrast, inverse, gram)
    error = np.abs(projected - contrast[:, :, None]).max(axis=(0, 1))
    return np.asarray(error <= 1e-8 * max(float(np.abs(contrast).max()), 1e-300))
