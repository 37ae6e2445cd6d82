"""Mixed-effects group fits: REML between-subject variances per voxel, then the GLS fit.

The model at a voxel, over the subjects ``i`` present there, is

    y_i = x_i' b + u_i + e_i,   var(y_i) = tau2_g(i) + s_i,

with ``s_i`` the subject's first-level variance at the voxel (known) and ``g(i)`` its
variance group (one group unless told otherwise; several give one ``tau2`` per group, as
FSL FLAME's variance groups). It is the model of FSL FLAME1 and AFNI 3dMEMA. A subject is
missing at a voxel when its effect or its variance is NaN there; it weighs nothing.

Estimation, one voxel at a time, compiled (:mod:`bigglm.group.reml`; only the median
variance of the convergence rule is taken over the whole block in numpy):

* **REML.** ``tau2`` maximises the restricted log-likelihood
  ``-1/2 [sum_i log(tau2_g(i) + s_i) + log det(X'WX) + y'Py]`` (:func:`reml_loglik`) with
  ``W = diag(1 / (tau2_g(i) + s_i))`` and ``P = W - W X (X'WX)^+ X'W``, subject to
  ``tau2 >= 0``. Its score and its expected (Fisher) and observed informations come from
  the ``P x P`` matrices ``X' W^k D_g X`` and sums over the subjects, two passes over a
  voxel's subjects per evaluation.
* **Start.** Per group, the moment estimate ``max(0, mean OLS residual^2 * n / (n - rank) -
  mean s)`` of the group's present subjects.
* **Steps.** Projected Newton. Groups at their bound whose score points below it are
  held there. The others climb the quadratic model of the log-likelihood (the observed
  information, i.e. exact Newton, where it is positive definite on them, else the
  Fisher information, i.e. scoring) within the box ``tau2 >= 0``, as a primal active-set
  method does: a step that meets a group's bound stops there, that group is held, and
  the others go on from that point. So ``tau2 = 0`` is reached exactly when REML's
  maximum lies there, and every step is an ascent direction. A step that lowers the
  REML log-likelihood by more than ``1e-10 * (1 + |loglik|)`` is halved and tried again
  (each try counts as an iteration). Like FLAME's, the search is local: with several
  groups the REML surface can have more than one maximum (or a flat ridge when
  ``n - rank`` is small), and the one reached from the start is reported.
* **Convergence**, per voxel: a voxel stops when every group's proposed (clamped) step
  is at most ``tolerance * (tau2_g + median s)``, the median over the voxel's present
  subjects; its estimates are those of the point the step was proposed from. A voxel
  still moving after ``max_iter`` keeps its last point and ``converged = False``. The design's
  rank at a voxel is that of its present subjects' rows, decided once.
* **GLS.** At the estimate, ``beta = (X'WX)^+ X'W y``; the covariance of ``beta`` is
  ``scale * (X'WX)^+``, with ``scale = 1`` (FLAME1, 3dMEMA) or, with Knapp–Hartung, the
  weighted residual mean square ``q = sum_i w_i r_i^2 / (n - rank)``, which widens (or
  narrows) the intervals by how far the residuals stray from their modelled variances.
  t statistics take ``n - rank`` degrees of freedom (``dof``), as FLAME1 and 3dMEMA do.

Edge cases. A voxel with ``n - rank < 1`` present subjects is not fitted (NaN ``beta``,
``tau2``, ``scale``, zero ``gram``). A group with no subject present at a voxel has NaN
``tau2`` there. A group the REML likelihood does not inform at a voxel (its Fisher
information below ``1e-10`` of ``1/2 sum w^2`` over its subjects: e.g. one subject with
its own column in the design) keeps its start value. Where a group has a subject with
variance exactly 0, its ``tau2`` is kept at least ``1e-10 * (OLS residual variance + mean
s)`` of the voxel, so that no weight is infinite; a voxel whose scale is 0 (every effect
fitted exactly, every variance 0) is not fitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bigglm.exceptions import DesignError
from bigglm.group.reml import fit_block, loglik_block, voxel_major

__all__ = ["fit_mixed", "reml_loglik"]

logger = logging.getLogger(__name__)

Array = NDArray[np.float64]
Ints = NDArray[np.int64]


@dataclass(frozen=True)
class _Subjects:
    """A block's data, voxel-major (a voxel's subjects contiguous, as the compiled REML
    reads them), subjects sorted by variance group; a missing subject has effect 0 and
    variance inf (so its weight is 0)."""

    effect: Array  # (v, n)
    variance: Array  # (v, n)
    design: Array  # (n, P)
    bounds: Ints  # (k + 1,) group g's subjects are bounds[g]:bounds[g + 1]


def fit_mixed(
    effect: ArrayLike,
    variance: ArrayLike,
    design: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    knapp_hartung: bool = False,
    max_iter: int = 200,
    tolerance: float = 1e-10,
) -> dict[str, np.ndarray]:
    """Fit the mixed-effects group model at every voxel of a block, by REML then GLS.

    The model, algorithm, convergence rule and edge cases are in the module docstring
    (:mod:`bigglm.group.mixed`). Computation is in float64.

    Parameters
    ----------
    effect, variance : array_like, shape (n, v)
        First-level effects and their variances, subjects by voxels (float32 or float64).
        NaN in either marks the subject missing at that voxel.
    design : array_like, shape (n, P)
        The group design.
    groups : array_like of int, shape (n,), optional
        Variance group of each subject, codes ``0 .. k-1``, each used. None: one group.
    knapp_hartung : bool
        Scale the covariance of ``beta`` by the weighted residual mean square.
    max_iter : int
        Most REML iterations per voxel.
    tolerance : float
        Relative step at which a voxel has converged (see the module docstring).

    Returns
    -------
    dict of numpy.ndarray
        ``beta`` (P, v); ``gram`` (P, P, v), ``X' W X`` at the estimate (missing subjects
        weigh 0); ``tau2`` (k, v); ``n`` (v,) subjects present; ``rank`` (v,); ``dof``
        (v,) ``n - rank``; ``scale`` (v,), so that the covariance of ``beta`` is
        ``scale * pinv(gram)``; ``converged`` (v,); ``iterations`` (v,).

    Raises
    ------
    DesignError
        If shapes disagree, a variance is negative, a value is infinite, the design is
        not finite, the group codes are not ``0 .. k-1``, ``max_iter`` is negative or
        ``tolerance`` is not positive.

    Examples
    --------
    >>> effect = np.array([[1.0], [2.0], [4.0], [3.0], [7.0], [5.0]])
    >>> variance = np.full((6, 1), 0.5)
    >>> fit = fit_mixed(effect, variance, np.ones((6, 1)))
    >>> fit["beta"].round(4), fit["tau2"].round(4), fit["dof"], fit["converged"]
    (array([[3.6667]]), array([[4.1667]]), array([5.]), array([ True]))
    """
    _check_options(max_iter, tolerance)
    subjects = _as_subjects(effect, variance, design, groups)
    return _fit(subjects, max_iter=max_iter, tolerance=tolerance, knapp_hartung=knapp_hartung)


def reml_loglik(
    tau2: ArrayLike,
    effect: ArrayLike,
    variance: ArrayLike,
    design: ArrayLike,
    *,
    groups: ArrayLike | None = None,
) -> Array:
    """The REML log-likelihood of each voxel at given between-subject variances.

    ``-1/2 [sum_i log(tau2_g(i) + s_i) + log pdet(X'WX) + y'Py]`` over the present
    subjects, up to a constant (``pdet``: the product of the nonzero eigenvalues, so a
    rank-deficient design gives the likelihood of its column space). Where some
    ``tau2_g + s_i <= 0`` the value is NaN.

    Parameters
    ----------
    tau2 : array_like, shape (k, v), or broadcastable to it
        Between-subject variance of each group at each voxel.
    effect, variance, design, groups
        As for :func:`fit_mixed`.

    Returns
    -------
    numpy.ndarray, shape (v,)

    Raises
    ------
    DesignError
        As :func:`fit_mixed`, or if ``tau2`` does not broadcast to ``(k, v)``.

    Examples
    --------
    >>> effect = np.array([[1.0], [2.0], [4.0], [3.0], [7.0], [5.0]])
    >>> variance = np.full((6, 1), 0.5)
    >>> loglik = reml_loglik([[0.0, 4.1667, 20.0]], np.repeat(effect, 3, axis=1),
    ...                      np.repeat(variance, 3, axis=1), np.ones((6, 1)))
    >>> int(np.argmax(loglik))
    1
    """
    subjects = _as_subjects(effect, variance, design, groups)
    shape = (subjects.bounds.size - 1, subjects.effect.shape[0])
    try:
        values = np.broadcast_to(np.asarray(tau2, dtype=np.float64), shape)
    except ValueError:
        raise DesignError(
            f"tau2 has shape {np.shape(tau2)} but the data have {shape[0]} variance "
            f"group(s) and {shape[1]} voxels; pass one value per group and voxel"
        ) from None
    loglik = np.empty(shape[1])
    loglik_block(
        subjects.effect, subjects.variance, subjects.design, subjects.bounds,
        np.ascontiguousarray(values.T), loglik,
    )  # fmt: skip
    return loglik


# --- input ---------------------------------------------------------------------------


def _check_options(max_iter: int, tolerance: float) -> None:
    """Refuse a negative iteration count or a non-positive tolerance."""
    if max_iter < 0:
        raise DesignError(f"max_iter is {max_iter}; pass 0 or more iterations")
    if not tolerance > 0:
        raise DesignError(f"tolerance is {tolerance}; pass a positive relative step")


def _as_subjects(
    effect: ArrayLike, variance: ArrayLike, design: ArrayLike, groups: ArrayLike | None
) -> _Subjects:
    """Checked voxel-major float64 copies, subjects sorted by group, missing ones
    neutralised (effect 0, variance inf)."""
    x = np.ascontiguousarray(design, dtype=np.float64)
    y_in, s_in = (_floating(a) for a in (effect, variance))
    _check_shapes(y_in.shape, s_in.shape, x.shape)
    order, bounds = _group_rows(groups, x.shape[0])
    if order is not None:
        y_in, s_in, x = y_in[order], s_in[order], x[order]
    _check_values(y_in, s_in, x)
    y, s = np.empty(y_in.shape[::-1]), np.empty(y_in.shape[::-1])
    voxel_major(y_in, s_in, y, s)
    return _Subjects(y, s, x, bounds)


def _floating(values: ArrayLike) -> NDArray[np.floating[Any]]:
    """A C-contiguous float32 or float64 array (other types as float64)."""
    array = np.asarray(values)
    dtype = array.dtype if array.dtype in (np.float32, np.float64) else np.float64
    return np.ascontiguousarray(array, dtype=dtype)


def _check_shapes(
    effect: tuple[int, ...], variance: tuple[int, ...], design: tuple[int, ...]
) -> None:
    """Effects and variances (n, v) alike, a design (n, P)."""
    if len(effect) != 2 or effect != variance:
        raise DesignError(
            f"effect has shape {effect} and variance {variance}; both must be "
            "(subjects, voxels) with the same shape"
        )
    if len(design) != 2 or design[0] != effect[0]:
        raise DesignError(
            f"design has shape {design} but there are {effect[0]} subjects; the design "
            "needs one row per subject (the rows of effect and variance)"
        )


def _group_rows(groups: ArrayLike | None, n: int) -> tuple[Ints | None, Ints]:
    """The row order that sorts subjects by group (None: already sorted) and the bounds
    of each group's rows (``bounds[g]:bounds[g + 1]``)."""
    if groups is None:
        return None, np.array([0, n], dtype=np.int64)
    codes = np.asarray(groups)
    if codes.shape != (n,) or not np.issubdtype(codes.dtype, np.integer):
        raise DesignError(
            f"groups has shape {codes.shape} and dtype {codes.dtype}; pass one integer "
            f"code per subject ({n})"
        )
    counts = np.bincount(codes, minlength=1) if codes.size and codes.min() >= 0 else None
    if counts is None or not np.all(counts > 0):
        raise DesignError(
            f"group codes are {np.unique(codes).tolist()}; number the variance groups "
            "0 .. k-1, each with at least one subject"
        )
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    sorted_already = bool(np.all(order == np.arange(n)))
    return (None if sorted_already else order), bounds


def _check_values(effect: np.ndarray, variance: np.ndarray, design: Array) -> None:
    """No infinite effect or variance, no negative variance, a finite design."""
    for name, values in (("effect", effect), ("variance", variance)):
        infinite = int(np.count_nonzero(np.isinf(values)))
        if infinite:
            raise DesignError(
                f"{name} has {infinite} infinite value(s); mark a missing subject with NaN"
            )
    with np.errstate(invalid="ignore"):
        negative = variance < 0
    if negative.any():
        subject, voxel = np.argwhere(negative)[0]
        raise DesignError(
            f"variance has {int(negative.sum())} negative value(s) (e.g. "
            f"{variance[subject, voxel]:g} at voxel {voxel}); first-level variances must "
            "be >= 0: check that variance (not standard error or t) maps were given"
        )
    if not np.all(np.isfinite(design)):
        raise DesignError("design has NaN or infinite entries; every entry must be finite")


def _median_present(variance: Array) -> Array:
    """The median of each voxel's present (finite) variances, NaN where none: one
    partition per number of subjects present (missing ones are inf, sorted last)."""
    v = variance.shape[0]
    present = np.count_nonzero(variance != np.inf, axis=1)
    median = np.full(v, np.nan)
    for m in np.unique(present[present > 0]).tolist():
        rows = np.flatnonzero(present == m)
        values = variance if rows.size == v else variance[rows]
        middle = (m - 1) // 2
        part = np.partition(values, middle, axis=1)
        upper = part[:, middle] if m % 2 else part[:, middle + 1 :].min(axis=1)
        median[rows] = 0.5 * (part[:, middle] + upper)
    return median


# --- fit and output ------------------------------------------------------------------


def _fit(
    subjects: _Subjects, *, max_iter: int, tolerance: float, knapp_hartung: bool
) -> dict[str, np.ndarray]:
    """The compiled start, REML and GLS (:func:`bigglm.group.reml.fit_block`), as arrays."""
    v, p, k = subjects.effect.shape[0], subjects.design.shape[1], subjects.bounds.size - 1
    found = (
        np.full((v, p), np.nan), np.zeros((v, p, p)), np.full((v, k), np.nan),
        np.full(v, np.nan), np.zeros(v, dtype=np.bool_), np.zeros(v, dtype=np.int64),
        np.zeros(v, dtype=np.int64), np.zeros((v, k), dtype=np.int64), np.zeros(v, dtype=np.bool_),
    )  # fmt: skip
    typical = _median_present(subjects.variance)
    fit_block(
        subjects.effect, subjects.variance, subjects.design, subjects.bounds, typical,
        max_iter, tolerance, found,
    )  # fmt: skip
    beta, gram, tau2, quadratic, converged, iterations, rank, counts, fitted = found
    n_present = counts.sum(axis=1)
    dof = (n_present - rank).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = quadratic / dof
    out = {
        "beta": beta.T, "gram": gram.transpose(1, 2, 0),
        "tau2": np.where(counts.T > 0, tau2.T, np.nan), "n": n_present, "rank": rank,
        "dof": dof, "scale": np.where(fitted, q if knapp_hartung else 1.0, np.nan),
        "converged": converged, "iterations": iterations,
    }  # fmt: skip
    if fitted.any():
        logger.debug(
            "mixed fit: %d voxels, median %g iterations, %d not converged",
            int(fitted.sum()), float(np.median(iterations[fitted])),
            int((fitted & ~converged).sum()),
        )  # fmt: skip
    return out
