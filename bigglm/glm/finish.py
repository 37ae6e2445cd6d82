"""Finish one voxel block: betas, residual variance and AR coefficients from the sums.

No data are read here: the inputs are the tree-reduced :class:`~bigglm.glm.stats.Partial`
of a voxel block and the run's :class:`~bigglm.glm.stats.DesignTerms`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from bigglm.glm import ar
from bigglm.glm.ar1 import Ar1Basis, ar1_inverse_form, ar1_solve_rotated
from bigglm.glm.linalg import cholesky_solve, serial_matmul, solve_psd, voxels_per_batch
from bigglm.glm.stats import DesignTerms, Partial

__all__ = ["STATUS_FLAGS", "ar_contrast_variance", "finish_block"]

Array = NDArray[np.float64]

#: Values of the per-voxel ``status`` variable (CF ``flag_values`` / ``flag_meanings``).
STATUS_FLAGS = {"ok": 0, "constant": 1, "nonstationary": 2, "nonfinite": 3}

#: Voxels per vectorised Cholesky solve (their P x P Grams stay in cache).
_SOLVE_SLAB = 2048


def finish_block(total: Partial, offset: Array, terms: DesignTerms) -> dict[str, Array]:
    """Fit every voxel of a block from its sufficient statistics.

    Parameters
    ----------
    total : Partial
        Statistics summed over all scans of the run.
    offset : numpy.ndarray, shape (v,)
        The per-voxel value that was subtracted from the data.
    terms : DesignTerms
        The run's design terms (``terms.order`` > 0 selects AR(p) GLS).

    Returns
    -------
    dict
        ``beta`` (P, v), ``sigma2`` (v,), ``ar`` (p, v) and ``status`` (v,) int8; the
        statistics of voxels whose status is not ``ok`` are NaN.

    Examples
    --------
    >>> x = np.column_stack([np.arange(5.0), np.ones(5)])
    >>> terms = DesignTerms.build(x, order=0)
    >>> from bigglm.glm.stats import chunk_statistics
    >>> y = (2 * np.arange(5.0) + 7)[:, None]
    >>> out = finish_block(chunk_statistics(y, y[0], terms, 0), y[0], terms)
    >>> out["beta"][:, 0]
    array([2., 7.])
    """
    dof = terms.variance_dof
    energy = total.lag_sums[0]
    status = np.select(
        [~np.isfinite(energy), energy == 0],
        [STATUS_FLAGS["nonfinite"], STATUS_FLAGS["constant"]],
        STATUS_FLAGS["ok"],
    ).astype(np.int8)
    if terms.order == 0:
        beta = serial_matmul(terms.gram_pinv, total.cross)
        rss = energy - np.einsum("av,av->v", beta, total.cross)
        phi = np.zeros((0, beta.shape[1]))
    elif (basis := terms.ar1) is not None:
        rotated = _ar1_rotated(total, terms, basis)
        phi = _coefficients(_ar1_residual_lag_sums(total, rotated, basis), terms, status)
        beta, rss = _ar1_gls(total, rotated, np.nan_to_num(phi), terms, basis)
    else:
        cross = terms.lag_cross(total)
        ols_beta = serial_matmul(terms.gram_pinv, cross[0])
        acov = _residual_lag_sums(total.lag_sums, cross, ols_beta, terms)
        phi = _coefficients(acov, terms, status)
        beta, rss = _gls(total, cross, np.nan_to_num(phi), terms)
    if terms.constant_fit is not None:
        beta = beta + np.outer(terms.constant_fit, offset)
    bad = status != 0
    beta[:, bad] = np.nan
    sigma2 = np.where(bad, np.nan, np.maximum(rss, 0.0) / dof)
    return {"beta": beta, "sigma2": sigma2, "ar": phi, "status": status}


def _coefficients(acov: Array, terms: DesignTerms, status: NDArray[np.int8]) -> Array:
    """Yule–Walker AR coefficients; non-stationary voxels are flagged in ``status`` (in
    place) and they, like every voxel that is not ok, get NaN."""
    phi = ar.yule_walker(acov, terms.matrix.shape[0])
    stationary = ar.is_stationary(phi)
    status[(status == 0) & ~stationary] = STATUS_FLAGS["nonstationary"]
    return np.where(status == 0, phi, np.nan)


def _residual_lag_sums(lag_sums: Array, cross: Array, beta: Array, terms: DesignTerms) -> Array:
    """``e'L^k e`` for k = 0..p of the OLS residuals ``e = Y - X beta``, exactly."""
    out = [lag_sums[0] - np.einsum("av,av->v", beta, cross[0])]
    for k in range(1, terms.order + 1):
        quad = np.einsum("av,av->v", beta, serial_matmul(terms.lag_gram[k], beta))
        out.append(lag_sums[k] - np.einsum("av,av->v", beta, cross[k]) + quad / 2)
    return np.stack(out)


def _ar1_rotated(total: Partial, terms: DesignTerms, basis: Ar1Basis) -> Array:
    """``K'X'Y`` and ``K'((L + F)X)'Y`` stacked, (2r, v), K of :class:`~bigglm.glm.ar1.Ar1Basis`.

    In these coordinates AR(1) needs no P x P product per voxel: ``K'X'XK = I`` and
    ``K'X'(L + F)XK = diag(lam)``, and ``K'`` of the design's first and last rows are
    the basis's ``corners``.
    """
    k_t = basis.transform.T
    rank, n_reg = k_t.shape
    combination = np.zeros((2 * rank, 2 * n_reg))
    combination[:rank, :n_reg] = k_t
    combination[rank:, n_reg:] = k_t
    return terms.lag_cross(total, combination=combination)


def _ar1_residual_lag_sums(total: Partial, rotated: Array, basis: Ar1Basis) -> Array:
    """:func:`_residual_lag_sums` for AR(1) in the basis's coordinates (OLS ``beta = K c0``)."""
    c0, c1 = np.split(rotated, 2)
    fitted = np.einsum("iv,iv->v", c0, c0)
    lagged = np.einsum("iv,iv->v", c0, c1) - np.einsum("i,iv,iv->v", basis.eigenvalues, c0, c0) / 2
    return np.stack([total.lag_sums[0] - fitted, total.lag_sums[1] - lagged])


def _ar1_gls(
    total: Partial, rotated: Array, phi: Array, terms: DesignTerms, basis: Ar1Basis
) -> tuple[Array, Array]:
    """AR(1) GLS betas and whitened residual sums of squares in the basis's coordinates.

    ``K'X'QY = (1 + r^2) c0 - r c1 - r^2 (w_first y_1 + w_last y_T)`` is solved by
    :func:`~bigglm.glm.ar1.ar1_solve_rotated` (``beta = K`` times the solution); voxels
    whose rank-2 correction is too close to singular take the general path.
    """
    r = phi[0]
    c0, c1 = np.split(rotated, 2)
    head, tail = total.head[0], total.tail[0]
    s = (1.0 + r**2) * c0 - r * c1
    s -= r**2 * (basis.corners[:, :1] * head + basis.corners[:, 1:] * tail)
    band = ar.band_coefficients(phi)
    top, bottom = ar.corner_correction(phi)
    yqy = ar.whitened_energy(band, top, bottom, total.lag_sums, total.head, total.tail)
    inner, ok = ar1_solve_rotated(basis, r, s)
    beta = serial_matmul(basis.transform, inner)
    rss = yqy - np.einsum("iv,iv->v", inner, s)
    todo = np.flatnonzero(~ok)
    if todo.size:
        part = Partial(
            cross=total.cross[:, todo],
            lag_sums=total.lag_sums[:, todo],
            head=total.head[:, todo],
            tail=total.tail[:, todo],
        )
        beta[:, todo], rss[todo] = _gls(part, terms.lag_cross(part), phi[:, todo], terms)
    return beta, rss


def _gls(total: Partial, cross: Array, phi: Array, terms: DesignTerms) -> tuple[Array, Array]:
    """GLS betas and whitened residual sums of squares from each voxel's whitened Gram.

    The general path (AR(p) with p > 1, and AR(1) voxels with ``|phi|`` a hair below 1),
    in voxel batches that bound the P x P matrices held at once.
    """
    n_reg, n_vox = terms.matrix.shape[1], phi.shape[1]
    step = voxels_per_batch(n_reg)
    beta = np.empty((n_reg, n_vox))
    rss = np.empty(n_vox)
    for lo in range(0, n_vox, step):
        sl = slice(lo, min(lo + step, n_vox))
        xqy, yqy = _whitened_data(total, cross, phi, terms, sl)
        beta[:, sl] = _general_solve(terms, phi[:, sl], xqy[:, None, :])[:, 0, :]
        rss[sl] = yqy - np.einsum("av,av->v", beta[:, sl], xqy)
    return beta, rss


def _general_solve(terms: DesignTerms, phi: Array, rhs: Array) -> Array:
    """``(X'QX)^+ rhs`` per voxel from each voxel's whitened Gram, voxel axis last.

    Full-rank designs: a Cholesky solve vectorised over the voxels; the pseudo-inverse
    (:func:`~bigglm.glm.linalg.solve_psd`) for rank-deficient designs and for any voxel
    whose Gram is not numerically positive definite.

    Parameters
    ----------
    terms : DesignTerms
    phi : numpy.ndarray, shape (p, v)
    rhs : numpy.ndarray, shape (P, k, v)

    Returns
    -------
    numpy.ndarray, shape (P, k, v)
    """
    x, p = terms.matrix, terms.order
    band = ar.band_coefficients(phi)
    top, bottom = ar.corner_correction(phi)
    if terms.rank == x.shape[1]:
        out = np.empty(rhs.shape)
        ok = np.empty(rhs.shape[-1], dtype=bool)
        for lo in range(0, rhs.shape[-1], _SOLVE_SLAB):  # (P, P, slab) stays in cache
            sl = slice(lo, lo + _SOLVE_SLAB)
            pieces = (band[:, sl], top[sl], bottom[sl], terms.lag_gram, x[:p], x[-p:])
            out[:, :, sl], ok[sl] = cholesky_solve(ar.whitened_gram_stack(*pieces), rhs[:, :, sl])
        todo = np.flatnonzero(~ok)
    else:
        out = np.empty(rhs.shape)
        todo = np.arange(rhs.shape[-1])
    if todo.size:
        gram = ar.whitened_gram(
            band[:, todo], top[todo], bottom[todo], terms.lag_gram, x[:p], x[-p:]
        )
        rows = np.ascontiguousarray(rhs[:, :, todo].transpose(2, 0, 1))
        out[:, :, todo] = solve_psd(gram, rows, terms.rank).transpose(1, 2, 0)
    return out


def _whitened_data(
    total: Partial, cross: Array, phi: Array, terms: DesignTerms, sl: slice | NDArray[np.intp]
) -> tuple[Array, Array]:
    """``X'QY`` (P, v) and ``Y'QY`` (v,) of the voxels ``sl``."""
    x, p = terms.matrix, terms.order
    band = ar.band_coefficients(phi[:, sl])
    top, bottom = ar.corner_correction(phi[:, sl])
    heads = (x[:p], total.head[:, sl])
    tails = (x[-p:], total.tail[:, sl])
    xqy = ar.whitened_cross(band, top, bottom, cross[:, :, sl], heads, tails)
    yqy = ar.whitened_energy(
        band, top, bottom, total.lag_sums[:, sl], total.head[:, sl], total.tail[:, sl]
    )
    return xqy, yqy


def ar_contrast_variance(terms: DesignTerms, phi: Array, contrast: Array) -> Array:
    """``C (X~'X~)^+ C'`` per voxel for AR coefficients ``phi``, from the design alone.

    Parameters
    ----------
    terms : DesignTerms
    phi : numpy.ndarray, shape (p, v)
        AR coefficients (NaN allowed: those voxels give NaN).
    contrast : numpy.ndarray, shape (q, P)

    Returns
    -------
    numpy.ndarray, shape (q, q, v)

    Examples
    --------
    >>> terms = DesignTerms.build(np.ones((6, 1)), order=1)
    >>> ar_contrast_variance(terms, np.zeros((1, 1)), np.ones((1, 1)))  # white noise: 1 / T
    array([[[0.16666667]]])
    """
    bad = ~np.all(np.isfinite(phi), axis=0)
    clean = np.where(bad, 0.0, phi)
    if terms.ar1 is not None:
        out, ok = ar1_inverse_form(terms.ar1, clean[0], contrast)
        todo = np.flatnonzero(~ok)
    else:
        out = np.empty((contrast.shape[0], contrast.shape[0], phi.shape[1]))
        todo = np.arange(phi.shape[1])
    if todo.size:
        rhs = np.broadcast_to(contrast.T[:, :, None], (*contrast.T.shape, todo.size))
        solution = _general_solve(terms, clean[:, todo], rhs)
        out[:, :, todo] = np.einsum("ia,ajv->ijv", contrast, solution)
    out[:, :, bad] = np.nan
    return out
