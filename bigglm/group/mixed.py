"""Mixed-effects group fits: REML between-subject variances per voxel, then the GLS fit.

The model at a voxel, over the subjects ``i`` present there, is

    y_i = x_i' b + u_i + e_i,   var(y_i) = tau2_g(i) + s_i,

with ``s_i`` the subject's first-level variance at the voxel (known) and ``g(i)`` its
variance group (one group unless told otherwise; several give one ``tau2`` per group, as
FSL FLAME's variance groups). It is the model of FSL FLAME1 and AFNI 3dMEMA. A subject is
missing at a voxel when its effect or its variance is NaN there; it weighs nothing.

Estimation, for a whole block of voxels at once (no loop over voxels):

* **REML.** ``tau2`` maximises the restricted log-likelihood
  ``-1/2 [sum_i log(tau2_g(i) + s_i) + log det(X'WX) + y'Py]`` (:func:`reml_loglik`) with
  ``W = diag(1 / (tau2_g(i) + s_i))`` and ``P = W - W X (X'WX)^+ X'W``, subject to
  ``tau2 >= 0``. Its score and its expected (Fisher) and observed informations come from
  per-voxel ``P x P`` matrices ``X' W^k D_g X`` (:func:`bigglm.group.voxelwise.weighted_grams`,
  one matrix product each) and sums over subjects.
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
  subjects; its estimates are those of the point the step was proposed from. Converged
  voxels leave the active set, so later iterations cost only what is left. A voxel still
  moving after ``max_iter`` keeps its last point and ``converged = False``.
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
from bigglm.group.voxelwise import outer_rows, pinv_and_rank, weighted_grams

__all__ = ["fit_mixed", "reml_loglik"]

logger = logging.getLogger(__name__)

Array = NDArray[np.float64]
Ints = NDArray[np.int64]
Bools = NDArray[np.bool_]

#: Relative size of a REML log-likelihood drop that makes a step be halved.
_ASCENT_SLACK = 1e-10

#: A group's Fisher information below this fraction of ``1/2 sum w^2`` is no information.
_NO_INFORMATION = 1e-10

#: Lower bound of ``tau2``, relative to the voxel's scale, for groups with a zero variance.
_ZERO_VARIANCE_FLOOR = 1e-10


@dataclass
class _Subjects:
    """A block's data, rows sorted by variance group; a missing subject has effect 0 and
    variance inf (so its weight is 0). The iteration shrinks it to its active voxels."""

    effect: Array  # (n, v)
    variance: Array  # (n, v)
    design: Array  # (n, P)
    outer: Array  # (n, P * P)
    groups: tuple[slice, ...]  # the rows of each variance group

    def keep_voxels(self, keep: Ints) -> None:
        """Keep only the voxels ``keep`` lists, in place (the others' memory is freed)."""
        self.effect = np.take(self.effect, keep, axis=1)  # 5x faster than [:, keep]
        self.variance = np.take(self.variance, keep, axis=1)


@dataclass
class _Point:
    """The REML fit at one ``tau2`` per voxel; derivatives only when asked for."""

    loglik: Array  # (v,)
    beta: Array  # (P, v)
    gram: Array  # (P, P, v)
    rank: Ints  # (v,)
    quadratic: Array  # (v,) y'Py = sum w r^2
    score: Array | None = None  # (k, v)
    fisher: Array | None = None  # (k, k, v)
    observed: Array | None = None  # (k, k, v)
    squares: Array | None = None  # (k, v) sum over the group of w^2


@dataclass(frozen=True)
class _Start:
    """Where the iteration starts and what bounds it, for every voxel of the block."""

    tau2: Array  # (k, v)
    floor: Array  # (k, v)
    present: Ints  # (k, v) subjects of each group present
    rank: Ints  # (v,) the design's rank over the present subjects
    typical: Array  # (v,) median variance of the present subjects
    fitted: Bools  # (v,) n - rank >= 1 and a scale


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
    with np.errstate(divide="ignore", invalid="ignore"):
        start = _start(subjects)
        out = _empty_result(subjects, start)
        active = np.flatnonzero(start.fitted)
        if active.size:
            _iterate(subjects, start, active, out, max_iter=max_iter, tolerance=tolerance)
    _finish(out, start, knapp_hartung)
    return out


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
    ``tau2_g + s_i <= 0`` the value is NaN or infinite.

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
    shape = (len(subjects.groups), subjects.effect.shape[1])
    try:
        values = np.broadcast_to(np.asarray(tau2, dtype=np.float64), shape)
    except ValueError:
        raise DesignError(
            f"tau2 has shape {np.shape(tau2)} but the data have {shape[0]} variance "
            f"group(s) and {shape[1]} voxels; pass one value per group and voxel"
        ) from None
    with np.errstate(divide="ignore", invalid="ignore"):
        return _evaluate(values, subjects, derivatives=False).loglik


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
    """Checked float64 copies, rows sorted by group, missing subjects neutralised."""
    x = np.asarray(design, dtype=np.float64)
    y_in, s_in = np.asarray(effect), np.asarray(variance)
    _check_shapes(y_in.shape, s_in.shape, x.shape)
    order, slices = _group_rows(groups, x.shape[0])
    if order is None:
        y, s = np.array(y_in, dtype=np.float64), np.array(s_in, dtype=np.float64)
    else:
        y, s, x = (a[order].astype(np.float64, copy=False) for a in (y_in, s_in, x))
    _check_values(y, s, x)
    missing = np.isnan(y) | np.isnan(s)
    y[missing] = 0.0
    s[missing] = np.inf
    return _Subjects(y, s, x, outer_rows(x), slices)


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


def _group_rows(groups: ArrayLike | None, n: int) -> tuple[Ints | None, tuple[slice, ...]]:
    """The row order that sorts subjects by group (None: already sorted), each group's rows."""
    if groups is None:
        return None, (slice(0, n),)
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
    ends = np.cumsum(counts)
    slices = tuple(slice(int(e - c), int(e)) for c, e in zip(counts, ends, strict=True))
    sorted_already = bool(np.all(order == np.arange(n)))
    return (None if sorted_already else order), slices


def _check_values(effect: Array, variance: Array, design: Array) -> None:
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


# --- the REML point ------------------------------------------------------------------


def _weights(tau2: Array, subjects: _Subjects) -> Array:
    """``1 / (tau2_g(i) + s_i)`` for every subject and voxel (0 where missing)."""
    weights = np.empty_like(subjects.variance)
    for g, rows in enumerate(subjects.groups):
        np.add(tau2[g], subjects.variance[rows], out=weights[rows])
    return np.divide(1.0, weights, out=weights)


def _evaluate(tau2: Array, subjects: _Subjects, *, derivatives: bool) -> _Point:
    """The GLS fit and REML log-likelihood at ``tau2`` (and its derivatives if asked)."""
    w = _weights(tau2, subjects)
    scratch = np.zeros_like(w)
    np.log(w, out=scratch, where=w > 0)
    log_weights = scratch.sum(axis=0)
    beta, gram, inverse, rank, wr, quadratic = _gls(w, subjects, scratch)
    loglik = -0.5 * (-log_weights + _log_pdet(gram, inverse) + quadratic)
    point = _Point(loglik, beta, gram, rank, quadratic)
    if derivatives:
        _derivatives(point, w, wr, inverse, subjects, scratch)
    return point


def _gls(
    w: Array, subjects: _Subjects, scratch: Array
) -> tuple[Array, Array, Array, Ints, Array, Array]:
    """``beta``, ``X'WX``, its pinv and rank, ``W r`` (= P y) and ``y'Py``, at weights ``w``."""
    x = subjects.design
    gram = weighted_grams(w, subjects.outer)
    inverse, rank = pinv_and_rank(gram)
    np.multiply(w, subjects.effect, out=scratch)
    beta = np.einsum("ijv,jv->iv", inverse, x.T @ scratch)
    residual = x @ beta
    np.subtract(subjects.effect, residual, out=residual)
    quadratic = np.einsum("iv,iv,iv->v", w, residual, residual)
    return beta, gram, inverse, rank, np.multiply(w, residual, out=residual), quadratic


def _log_pdet(gram: Array, inverse: Array) -> Array:
    """Log of the product of the nonzero eigenvalues of each voxel's ``X'WX``."""
    p = gram.shape[0]
    null = np.eye(p)[:, :, None] - np.einsum("ijv,jkv->ikv", gram, inverse)
    return np.linalg.slogdet((gram + null).transpose(2, 0, 1))[1]


def _derivatives(
    point: _Point, w: Array, wr: Array, inverse: Array, subjects: _Subjects, scratch: Array
) -> None:
    """REML score, Fisher and observed information for each group's ``tau2``.

    With ``B_g = X'W^2 D_g X``, ``C_g = X'W^3 D_g X``, ``u_g = X'W D_g (W r)``::

        tr(P D_g)         = sum_g w - tr(A+ B_g)
        y'P D_g P y       = sum_g (w r)^2
        tr(P D_g P D_h)   = delta_gh (sum_g w^2 - 2 tr(A+ C_g)) + tr(A+ B_g A+ B_h)
        y'P D_g P D_h P y = delta_gh sum_g w (w r)^2 - u_g' A+ u_h
    """
    k, v = len(subjects.groups), w.shape[1]
    # gap: tr(P D_g) - y'P D_g P y (-2 score); own: the delta_gh part of tr(P D_g P D_h)
    own, squares, gap = np.empty((k, v)), np.empty((k, v)), np.empty((k, v))
    cubic, products, pulls = np.empty((k, v)), [], []
    for g, rows in enumerate(subjects.groups):
        wg, ag, tmp, outer = w[rows], wr[rows], scratch[rows], subjects.outer[rows]
        np.multiply(wg, wg, out=tmp)
        squares[g] = tmp.sum(axis=0)
        products.append(np.einsum("ijv,jkv->ikv", inverse, weighted_grams(tmp, outer)))
        np.multiply(tmp, wg, out=tmp)
        cubed = np.einsum("ijv,jiv->v", inverse, weighted_grams(tmp, outer))
        own[g] = squares[g] - 2.0 * cubed
        gap[g] = wg.sum(axis=0) - np.einsum("iiv->v", products[g])
        gap[g] -= np.einsum("iv,iv->v", ag, ag)
        cubic[g] = np.einsum("iv,iv,iv->v", wg, ag, ag)
        pulls.append(subjects.design[rows].T @ np.multiply(wg, ag, out=tmp))
    cross = np.einsum("gijv,hjiv->ghv", np.stack(products), np.stack(products))
    pull = np.stack(pulls)
    spread = np.einsum("giv,ijv,hjv->ghv", pull, inverse, pull)
    diagonal = np.eye(k)[:, :, None]
    point.fisher = 0.5 * (diagonal * own[:, None, :] + cross)
    point.observed = -point.fisher + diagonal * cubic[:, None, :] - spread
    point.score = -0.5 * gap
    point.squares = squares


# --- iteration -----------------------------------------------------------------------


def _start(subjects: _Subjects) -> _Start:
    """Moment estimates of ``tau2`` from OLS, the bounds, ranks and tolerance scales."""
    rank, counts, squares, sums, zero = _ols_by_group(subjects)
    n = counts.sum(axis=0)
    dof = n - rank
    moment = np.maximum(0.0, (squares * n / dof - sums) / counts)
    scale = squares.sum(axis=0) / dof + sums.sum(axis=0) / n
    floor = np.where(zero, _ZERO_VARIANCE_FLOOR * scale, 0.0)
    fitted = (dof >= 1) & ~(zero.any(axis=0) & ~(scale > 0))
    tau2 = np.where(counts > 0, np.maximum(moment, floor), 0.0)
    typical = _median_present(subjects.variance, n)
    return _Start(np.nan_to_num(tau2), np.nan_to_num(floor), counts, rank, typical, fitted)


def _ols_by_group(subjects: _Subjects) -> tuple[Ints, Ints, Array, Array, Bools]:
    """The design's rank at each voxel and, per group, the subjects present, their OLS
    residual sum of squares, their sum of variances, and whether one variance is 0."""
    present = np.isfinite(subjects.variance)
    inverse, rank = pinv_and_rank(weighted_grams(present.astype(np.float64), subjects.outer))
    beta = np.einsum("ijv,jv->iv", inverse, subjects.design.T @ subjects.effect)
    residual = subjects.design @ beta
    np.subtract(subjects.effect, residual, out=residual)
    np.multiply(residual, present, out=residual)
    rows = subjects.groups
    counts = np.stack([present[r].sum(axis=0) for r in rows])
    squares = np.stack([np.einsum("iv,iv->v", residual[r], residual[r]) for r in rows])
    sums = np.stack([np.sum(subjects.variance[r], axis=0, where=present[r]) for r in rows])
    zero = np.stack([(subjects.variance[r] == 0).any(axis=0) for r in rows])
    return rank, counts, squares, sums, zero


def _median_present(variance: Array, n: Ints) -> Array:
    """Median of each voxel's present variances (missing ones are inf, sorted last)."""
    if variance.shape[0] == 0:
        return np.full(variance.shape[1], np.nan)
    ordered = np.sort(variance, axis=0)
    middle = np.stack([np.maximum(n - 1, 0) // 2, n // 2])
    return np.asarray(np.take_along_axis(ordered, middle, axis=0).mean(axis=0))


def _iterate(
    subjects: _Subjects,
    start: _Start,
    active: Ints,
    out: dict[str, np.ndarray],
    *,
    max_iter: int,
    tolerance: float,
) -> None:
    """Projected Newton with step halving on the active voxels, writing into ``out``.

    ``subjects`` shrinks as voxels finish, so that memory and work follow the active set.
    """
    if active.size < subjects.effect.shape[1]:
        subjects.keep_voxels(active)
    tau2, floor = start.tau2[:, active], start.floor[:, active]
    typical = start.typical[active]
    point = _evaluate(tau2, subjects, derivatives=True)
    step = _step(point, tau2, floor)
    for iteration in range(max_iter + 1):
        small = np.all(np.abs(step) <= tolerance * (tau2 + typical), axis=0)
        done = small | (iteration == max_iter)
        if done.any():
            _store(out, active[done], _select(point, done), tau2[:, done], small[done], iteration)
            keep = ~done
            if not keep.any():
                return
            subjects.keep_voxels(np.flatnonzero(keep))
            active, point = active[keep], _select(point, keep)
            tau2, floor, step, typical = tau2[:, keep], floor[:, keep], step[:, keep], typical[keep]
        candidate = np.maximum(floor, tau2 + step)  # exactly on the bound when stepping to it
        trial = _evaluate(candidate, subjects, derivatives=True)
        better = trial.loglik >= point.loglik - _ASCENT_SLACK * (1.0 + np.abs(point.loglik))
        tau2 = np.where(better, candidate, tau2)
        point = _merge(better, trial, point)
        step = np.where(better, _step(trial, tau2, floor), 0.5 * step)


def _step(point: _Point, tau2: Array, floor: Array) -> Array:
    """The projected Newton (or scoring) step from ``tau2``, never below the bound.

    Groups at the bound whose score points below it, and groups without information,
    are held. The step then climbs the quadratic model of the log-likelihood over the
    box ``tau2 >= floor`` as a primal active-set method does: a Newton step of the free
    groups, cut short where it meets a group's bound, that group held from there on, and
    again from the point reached (at most ``k`` segments). The model rises along every
    segment, so the step is an ascent direction and halving it can only help.
    """
    assert point.score is not None and point.fisher is not None and point.squares is not None
    uninformed = np.einsum("ggv->gv", point.fisher) <= _NO_INFORMATION * 0.5 * point.squares
    held = uninformed | ((tau2 <= floor) & (point.score <= 0))
    information = _information(point, held)
    room = floor - tau2  # how far each group may go down (<= 0)
    step = np.zeros_like(tau2)
    for _ in range(tau2.shape[0]):
        slope = point.score - np.einsum("ghv,hv->gv", information, step)
        segment = _face_newton(information, slope, held)
        down = ~held & (segment < 0)
        ratio = np.where(down, (room - step) / np.where(down, segment, -1.0), np.inf)
        length = np.minimum(1.0, ratio.min(axis=0))
        blocked = down & (ratio <= length) & (length < 1.0)
        step = np.where(blocked, room, step + length * segment)
        if not blocked.any():
            break
        held |= blocked
    return np.maximum(floor, tau2 + step) - tau2


def _information(point: _Point, held: Bools) -> Array:
    """Per voxel the observed information where it is positive definite on the free
    groups (exact Newton), else the Fisher information (scoring)."""
    assert point.fisher is not None and point.observed is not None
    free = ~held[:, None, :] & ~held[None, :, :]
    eye = np.eye(held.shape[0])[:, :, None]
    newton = _positive_definite(np.where(free, point.observed, eye))
    return np.where(newton, point.observed, point.fisher)


def _face_newton(information: Array, slope: Array, held: Bools) -> Array:
    """The Newton step of the free groups, the held ones fixed: ``I_FF d_F = slope_F``."""
    free = ~held[:, None, :] & ~held[None, :, :]
    system = np.where(free, information, np.eye(held.shape[0])[:, :, None])
    inverse, _ = pinv_and_rank(system)
    return np.where(held, 0.0, np.einsum("ghv,hv->gv", inverse, np.where(held, 0.0, slope)))


def _positive_definite(matrices: Array) -> Bools:
    """Whether each voxel's ``k x k`` matrix is positive definite (after equilibration)."""
    diagonal = np.einsum("ggv->gv", matrices)
    root = np.sqrt(np.where(diagonal > 0, diagonal, 1.0))
    scaled = matrices / root[:, None, :] / root[None, :, :]
    smallest = np.linalg.eigvalsh(scaled.transpose(2, 0, 1))[:, 0]
    return np.asarray(np.all(diagonal > 0, axis=0) & (smallest > 1e-8))


def _select(point: _Point, keep: Bools) -> _Point:
    """The point at the voxels (last axis) ``keep`` selects."""
    fields: dict[str, Any] = {
        name: None if value is None else value[..., keep] for name, value in vars(point).items()
    }
    return _Point(**fields)


def _merge(better: Bools, trial: _Point, point: _Point) -> _Point:
    """Per voxel, ``trial`` where ``better`` else ``point`` (both with derivatives)."""
    fields: dict[str, Any] = {
        name: np.where(better, value, getattr(point, name)) for name, value in vars(trial).items()
    }
    return _Point(**fields)


# --- output --------------------------------------------------------------------------


def _empty_result(subjects: _Subjects, start: _Start) -> dict[str, np.ndarray]:
    """The output arrays, as for voxels that are not fitted."""
    p, v = subjects.design.shape[1], subjects.effect.shape[1]
    k = len(subjects.groups)
    return {
        "beta": np.full((p, v), np.nan),
        "gram": np.zeros((p, p, v)),
        "tau2": np.full((k, v), np.nan),
        "n": start.present.sum(axis=0).astype(np.int64),
        "rank": start.rank.copy(),
        "dof": np.zeros(v),
        "scale": np.full(v, np.nan),
        "converged": np.zeros(v, dtype=bool),
        "iterations": np.zeros(v, dtype=np.int64),
    }


def _store(
    out: dict[str, np.ndarray],
    voxels: Ints,
    point: _Point,
    tau2: Array,
    converged: Bools,
    iteration: int,
) -> None:
    """Write finished voxels' estimates (``scale`` holds ``y'Py`` until :func:`_finish`)."""
    out["beta"][:, voxels] = point.beta
    out["gram"][:, :, voxels] = point.gram
    out["tau2"][:, voxels] = tau2
    out["rank"][voxels] = point.rank
    out["scale"][voxels] = point.quadratic
    out["converged"][voxels] = converged
    out["iterations"][voxels] = iteration


def _finish(out: dict[str, np.ndarray], start: _Start, knapp_hartung: bool) -> None:
    """Degrees of freedom, the Knapp–Hartung scale, NaN ``tau2`` for absent groups."""
    out["dof"] = (out["n"] - out["rank"]).astype(np.float64)
    fitted = start.fitted
    with np.errstate(divide="ignore", invalid="ignore"):
        q = out["scale"] / out["dof"]
    out["scale"] = np.where(fitted, q if knapp_hartung else 1.0, np.nan)
    out["tau2"] = np.where(start.present > 0, out["tau2"], np.nan)
    count = int(fitted.sum())
    if count:
        logger.debug(
            "mixed fit: %d voxels, median %g iterations, %d not converged",
            count,
            float(np.median(out["iterations"][fitted])),
            int((fitted & ~out["converged"]).sum()),
        )
