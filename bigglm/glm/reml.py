"""SPM's restricted maximum likelihood (ReML) of covariance components, and its AR(0.2) model.

SPM's default serial-correlation model for fMRI (``'AR(1)'`` in the model specification)
is not a per-voxel AR fit: the covariance of the errors is one matrix for the whole
brain, ``V = h1*Q1 + h2*Q2``, whose two components are SPM's AR(0.2) expansion
(``spm_Ce('ar', n, 0.2)``) and whose hyperparameters ``h`` are estimated by ReML from a
sample covariance pooled over the voxels the effects of interest drive
(:mod:`bigglm.glm.pooled`). This module holds the parts that are pure linear algebra on
``n x n`` matrices:

- :func:`ar_matrix`: ``spm_Q(a, n)``, the AR(a) autocorrelation with SPM's cut of the
  innovation filter at 1e-4 (lags beyond ``log(1e-4)/log(a)`` are zero: 5 for a = 0.2);
- :func:`ar_components`: ``spm_Ce('ar', v, a)``: ``Q(a) -/+ a * dQ/da`` per session,
  the derivative by SPM's forward difference with step ``exp(-8)``;
- :func:`reml`: ``spm_reml``'s Fisher scoring, step for step: the design orthonormalised,
  ``h`` started at 1 for the first component covering each diagonal element, the
  hyperprior (mean 0, precision ``exp(-8)``), the update ``(expm(t*J) - I) J^-1 g`` with
  the regularisation ``t`` adapted as SPM does, and the stop when the predicted change of
  the free energy falls below 0.1. Reproducing the iteration, not only the optimum,
  matters: SPM stops before full convergence, and its ``h`` is where it stopped;
- :func:`whitening_matrix`: ``W = V^(-1/2)`` as ``spm_spm`` forms it (``spm_inv`` with its
  diagonal load, the symmetric square root, entries below 1e-6 set to zero).

What is not reproduced: ``spm_reml``'s Bayesian model reduction, which SPM runs only when
the estimated ``V`` is not positive semi-definite or the hyperparameters are not
identified (the log condition number of their precision above 16). bigglm refuses that
case with a message instead of removing components.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

from bigglm.exceptions import DesignError

__all__ = ["ar_components", "ar_matrix", "reml", "whitening_matrix"]

Array = NDArray[np.float64]

#: SPM's AR coefficient of its 'AR(1)' model (spm_fmri_spm_ui: ``spm_Ce('ar', nscan, 0.2)``).
SPM_AR = 0.2
#: spm_diff's finite-difference step.
_STEP = math.exp(-8)


def ar_matrix(a: float, n: int) -> Array:
    """SPM's AR(a) autocorrelation matrix (``spm_Q(a, n)``).

    The innovation filter ``inv(P)`` (``P`` lower bidiagonal, 1 and ``-a``) has its entries
    below 1e-4 set to zero before ``K K'`` is formed; the result is the Toeplitz matrix of
    its first column.

    Examples
    --------
    >>> ar_matrix(0.2, 8)[0].round(5).tolist()
    [1.0, 0.2, 0.04, 0.008, 0.0016, 0.00032, 0.0, 0.0]
    """
    lower = np.eye(n) - a * np.eye(n, k=-1)
    k = scipy.linalg.solve_triangular(lower, np.eye(n), lower=True)
    k = np.where(np.abs(k) > 1e-4, k, 0.0)
    return np.asarray(scipy.linalg.toeplitz((k @ k.T)[:, 0]), dtype=np.float64)


def ar_components(
    n_scans: int | Sequence[int], a: float = SPM_AR, *, release: str = "spm12"
) -> list[Array]:
    """SPM's covariance components for AR(a) errors (``spm_Ce('ar', n_scans, a)``).

    SPM12 expands about ``a`` as ``Q - a*dQ/da`` and ``Q + a*dQ/da``; SPM5 and SPM8 used
    ``Q`` and ``dQ/da``. The two pairs span the same covariances, so the ReML optimum is
    the same, but ReML starts from the first component and stops before convergence, so
    the estimates differ slightly; ``bigglm.fit(noise="spm-ar1")`` uses SPM12's.

    Parameters
    ----------
    n_scans : int or sequence of int
        Scans of each session; several sessions give block-diagonal components, two per
        session, in session order.
    a : float
        The AR coefficient the expansion is made about (SPM: 0.2).
    release : {"spm12", "spm8", "spm5"}
        Whose expansion.

    Returns
    -------
    list of numpy.ndarray, each (N, N) with N = sum(n_scans)
        Two components per session.

    Examples
    --------
    >>> q = ar_components(4)
    >>> len(q), np.allclose(q[0] + q[1], 2 * ar_matrix(0.2, 4))
    (2, True)
    >>> [c.shape for c in ar_components([3, 2])]
    [(5, 5), (5, 5), (5, 5), (5, 5)]
    """
    sizes = [int(n) for n in np.atleast_1d(np.asarray(n_scans))]
    if not sizes or min(sizes) < 2:
        raise DesignError(f"n_scans={sizes}: every session needs at least 2 scans")
    if release not in ("spm12", "spm8", "spm5"):
        raise DesignError(
            f"release={release!r} is not an SPM release; use 'spm12', 'spm8' or 'spm5'"
        )
    total, out, start = sum(sizes), [], 0
    for n in sizes:
        q = ar_matrix(a, n)
        dq = (ar_matrix(a + _STEP, n) - q) / _STEP
        for block in (q - dq * a, q + dq * a) if release == "spm12" else (q, dq):
            full = np.zeros((total, total))
            full[start : start + n, start : start + n] = block
            out.append(full)
        start += n
    return out


def reml(
    sample_covariance: ArrayLike,
    design: ArrayLike,
    components: Sequence[ArrayLike],
    *,
    n_samples: float = 1.0,
    max_iterations: int = 32,
    regularisation: float = 4.0,
    prior_precision: float = math.exp(-8),
) -> tuple[Array, Array]:
    """ReML hyperparameters of ``V = sum(h[i] * Q[i])`` from a sample covariance (``spm_reml``).

    Parameters
    ----------
    sample_covariance : array_like, shape (N, N)
        ``Y Y' / n_samples`` (SPM pools it over voxels; non-finite rows are left out).
    design : array_like, shape (N, P)
        The fixed effects whose space the residuals are restricted from.
    components : sequence of array_like, each (N, N)
        The covariance components ``Q``.
    n_samples : float
        Samples behind ``sample_covariance`` (SPM passes 1 for its pooled average).
    max_iterations, regularisation, prior_precision
        spm_reml's defaults (32, 4, exp(-8)).

    Returns
    -------
    V : numpy.ndarray, shape (N, N)
    h : numpy.ndarray, shape (Q,)

    Raises
    ------
    DesignError
        If the estimate is not positive semi-definite or its hyperparameters are not
        identified (where SPM would reduce the model).

    Examples
    --------
    White noise of variance 2 seen through its exact covariance, no design:

    >>> v, h = reml(2 * np.eye(50), np.zeros((50, 0)), [np.eye(50)])
    >>> round(float(h[0]), 3)
    2.0
    """
    yy = np.asarray(sample_covariance, dtype=np.float64)
    x = np.asarray(design, dtype=np.float64)
    full_q = [np.asarray(q, dtype=np.float64) for q in components]
    keep = np.flatnonzero(np.isfinite(yy).all(axis=0))
    yy = yy[np.ix_(keep, keep)]
    q = [c[np.ix_(keep, keep)] for c in full_q]
    basis = _orthonormal(x[keep])
    h = _initial(q)
    t, df, hess = regularisation, math.inf, np.zeros((len(q), len(q)))
    for _ in range(max_iterations):
        grad, hess = _score(yy, basis, q, h, n_samples)
        grad -= prior_precision * h
        hess -= prior_precision * np.eye(len(q))
        dh = _regularised_step(hess, grad, t)
        h = h + dh
        predicted = float(grad @ dh)
        t = max(t - 1, -8.0) if predicted > df else min(t + 0.25, 8.0)
        if not math.isfinite(predicted) or np.abs(dh).max() > 1e6:
            return reml(
                sample_covariance,
                design,
                components,
                n_samples=n_samples,
                max_iterations=max_iterations,
                regularisation=t,
                prior_precision=2 * prior_precision,
            )
        df = predicted
        if df < 1e-1:
            break
    v = sum((c * hi for c, hi in zip(full_q, h, strict=True)), np.zeros_like(full_q[0]))
    if t > -4:
        _check_identified(v, -hess, h)
    return v, h


def _orthonormal(x: Array) -> Array:
    """An orthonormal basis of the columns of ``x`` (``spm_svd(X, 0)``: components whose
    normalised squared singular value exceeds 64 eps)."""
    if x.shape[1] == 0 or not np.any(x):
        return x[:, :0]
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    power = s**2
    return u[:, power * power.size / power.sum() > 64 * np.finfo(np.float64).eps]


def _initial(q: list[Array]) -> Array:
    """1 for each component that first covers a diagonal element, 0 for the rest."""
    h, covered = np.zeros(len(q)), np.zeros(len(q[0]), dtype=bool)
    for i, c in enumerate(q):
        diagonal = np.diag(c) != 0
        h[i] = float(np.any(diagonal & ~covered))
        covered |= diagonal
    return h


def _spm_inv(a: Array) -> Array:
    """``inv(A + TOL*I)`` with spm_inv's tolerance ``max(eps(norm(A, inf)) * n, exp(-32))``."""
    n = a.shape[0]
    tol = max(float(np.spacing(np.abs(a).sum(axis=1).max())) * n, math.exp(-32))
    return np.asarray(np.linalg.inv(a + tol * np.eye(n)), dtype=np.float64)


def _score(
    yy: Array, basis: Array, q: list[Array], h: Array, n_samples: float
) -> tuple[Array, Array]:
    """ReML gradient and expected curvature with respect to ``h`` (spm_reml's M-step)."""
    inverse = _spm_inv(sum((c * hi for c, hi in zip(q, h, strict=True)), np.zeros_like(q[0])))
    icx = inverse @ basis
    projector = inverse - (icx @ _spm_inv(basis.T @ icx) @ icx.T if basis.shape[1] else 0.0)
    u = np.eye(len(yy)) - projector @ yy / n_samples
    pq = [projector @ c for c in q]
    grad = np.array([-np.sum(p.T * u) * n_samples / 2 for p in pq])
    hess = np.array([[-np.sum(a.T * b) * n_samples / 2 for b in pq] for a in pq])
    return grad, hess


def _regularised_step(hess: Array, grad: Array, t: float) -> Array:
    """spm_dx: ``(expm(T*J) - I) J^-1 g`` with ``T = exp(t - logdet(J)/n)``, from the
    matrix exponential of the system augmented by ``g``."""
    n = len(grad)
    scale = math.exp(t - _spm_logdet(hess) / n)
    if scale > math.exp(16):
        return np.asarray(-np.linalg.pinv(hess) @ grad, dtype=np.float64)
    augmented = np.zeros((n + 1, n + 1))
    augmented[1:, 0] = scale * grad
    augmented[1:, 1:] = scale * hess
    return np.asarray(scipy.linalg.expm(augmented)[1:, 0].real, dtype=np.float64)


def _spm_logdet(c: Array) -> float:
    """spm_logdet of a curvature: the log of the singular values in (1e-16, 1e16), or of
    the positive diagonal entries when ``c`` is diagonal (SPM's special case)."""
    keep = np.flatnonzero(np.diag(c))
    c = c[np.ix_(keep, keep)]
    diagonal = not np.any(c - np.diag(np.diag(c)))
    s = np.diag(c) if diagonal else np.linalg.svd(c, compute_uv=False)
    return float(np.sum(np.log(s[(s > 1e-16) & (s < 1e16)])))


def _check_identified(v: Array, precision: Array, h: Array) -> None:
    """Refuse the estimates SPM would reduce (not PSD, or hyperparameters not identified)."""
    smallest = float(np.min(np.linalg.eigvalsh(v)))
    condition = float(np.linalg.cond(precision, 1))
    if smallest < 0 or not math.log(condition) <= 16:
        raise DesignError(
            f"the ReML covariance estimate is not usable (smallest eigenvalue {smallest:.3g}, "
            f"log condition of the hyperparameter precision {math.log(condition):.3g}, "
            f"h = {np.round(h, 4).tolist()}); too few voxels or scans carry the effects of "
            "interest to pool a covariance: use noise='ols' or 'ar1'"
        )


def whitening_matrix(covariance: ArrayLike) -> Array:
    """``W = V^(-1/2)`` as spm_spm forms it, entries below 1e-6 in magnitude set to zero.

    Examples
    --------
    >>> whitening_matrix(4 * np.eye(3))[0]
    array([0.5, 0. , 0. ])
    """
    v = np.asarray(covariance, dtype=np.float64)
    values, vectors = np.linalg.eigh(_spm_inv(v))
    w = (vectors * np.sqrt(np.abs(values))) @ vectors.T
    return np.asarray(np.where(np.abs(w) > 1e-6, w, 0.0), dtype=np.float64)
