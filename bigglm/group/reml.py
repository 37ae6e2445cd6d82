"""Compiled per-voxel REML of the mixed-effects group model (numba, ``nogil`` for Dask).

The model, start, steps, convergence rule and edge cases are those
:mod:`bigglm.group.mixed` documents; this module runs them one voxel at a time, the
voxel's subjects contiguous in memory (``(voxel, subject)`` arrays, made by
:func:`voxel_major`). An evaluation of the REML point is two passes over the voxel's
subjects: the first forms ``X'WX`` and ``X'Wy`` for the GLS fit, the second takes the
residuals and, for the derivatives, ``X'W^2 D_g X``, ``X'W^3 D_g X`` and ``X'W D_g W r``
per variance group. The same iteration vectorised over a voxel block in numpy makes
about twenty passes over the whole ``(subject, voxel)`` block per step, memory-bound.

``sum_i log(tau2 + s_i)`` is a sum of logs of products of 16 factors, factor by factor
where a product leaves ``[1e-300, 1e300]`` (a log per subject costs more than the rest of
the pass).

Small symmetric matrices (``P x P`` and ``k x k``) are diagonalised by cyclic Jacobi
rotations, accurate to the last digits at these sizes and free of LAPACK's per-call
cost. All work arrays are allocated once per block (:func:`_workspace`).

A voxel's REML point is kept in two slots (a leading axis of 2): the current point and
a trial, so that accepting a step switches slots instead of copying.
"""

from __future__ import annotations

import math
from collections import namedtuple

import numba
import numpy as np

from bigglm.group.voxelwise import RANK_TOLERANCE

__all__ = ["fit_block", "loglik_block", "voxel_major"]

#: Relative size of a REML log-likelihood drop that makes a step be halved.
ASCENT_SLACK = 1e-10

#: A group's Fisher information below this fraction of ``1/2 sum w^2`` is no information.
NO_INFORMATION = 1e-10

#: Lower bound of ``tau2``, relative to the voxel's scale, for groups with a zero variance.
ZERO_VARIANCE_FLOOR = 1e-10

#: The smallest eigenvalue of an equilibrated observed information that counts as
#: positive definite (else the step uses the Fisher information).
_DEFINITE = 1e-8

#: Jacobi sweeps stop when the off-diagonal mass is below this fraction of the diagonal's.
_JACOBI_OFF = 1e-32
_JACOBI_SWEEPS = 60

_TILE = 64


# --- layout --------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def voxel_major(effect, variance, y, s):
    """``effect, variance (n, v)`` into ``y, s (v, n)`` float64, tile by tile; a subject
    missing at a voxel (NaN in either) becomes ``y = 0, s = inf`` there."""
    n, v = effect.shape
    for i0 in range(0, n, _TILE):
        for j0 in range(0, v, _TILE):
            for i in range(i0, min(i0 + _TILE, n)):
                for j in range(j0, min(j0 + _TILE, v)):
                    a, b = np.float64(effect[i, j]), np.float64(variance[i, j])
                    if math.isnan(a) or math.isnan(b):
                        y[j, i], s[j, i] = 0.0, math.inf
                    else:
                        y[j, i], s[j, i] = a, b


# --- small symmetric matrices --------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _eigh(matrix, values, vectors, work):
    """Eigenvalues (unordered, ``values[:p]``) and eigenvectors (columns) of a symmetric
    ``p x p`` matrix; ``vectors`` and ``work`` are ``p x p`` or larger."""
    p = matrix.shape[0]
    for i in range(p):
        for j in range(p):
            work[i, j] = matrix[i, j]
            vectors[i, j] = 1.0 if i == j else 0.0
    for _ in range(_JACOBI_SWEEPS):
        off, diagonal = 0.0, 0.0
        for i in range(p):
            diagonal += work[i, i] * work[i, i]
            for j in range(i + 1, p):
                off += work[i, j] * work[i, j]
        if off <= _JACOBI_OFF * diagonal or off == 0.0:
            break
        for i in range(p - 1):
            for j in range(i + 1, p):
                if work[i, j] != 0.0:
                    _rotate(work, vectors, p, i, j)
    for i in range(p):
        values[i] = work[i, i]


@numba.njit(cache=True, nogil=True)
def _rotate(work, vectors, p, i, j):
    """One Jacobi rotation zeroing ``work[i, j]``: ``work <- J' work J``, ``vectors J``."""
    theta = (work[j, j] - work[i, i]) / (2.0 * work[i, j])
    if abs(theta) > 1e150:
        t = 0.5 / theta
    else:
        t = 1.0 / (abs(theta) + math.sqrt(theta * theta + 1.0))
        if theta < 0.0:
            t = -t
    c = 1.0 / math.sqrt(t * t + 1.0)
    s = t * c
    for r in range(p):
        a, b = work[r, i], work[r, j]
        work[r, i] = c * a - s * b
        work[r, j] = s * a + c * b
    for r in range(p):
        a, b = work[i, r], work[j, r]
        work[i, r] = c * a - s * b
        work[j, r] = s * a + c * b
    for r in range(p):
        a, b = vectors[r, i], vectors[r, j]
        vectors[r, i] = c * a - s * b
        vectors[r, j] = s * a + c * b


@numba.njit(cache=True, nogil=True, inline="always")
def _ascending(values, order, p):
    """``order[:p]``: the indices that sort ``values[:p]`` ascending (insertion sort)."""
    for i in range(p):
        order[i] = i
        m = i
        while m > 0 and values[order[m - 1]] > values[order[m]]:
            order[m - 1], order[m] = order[m], order[m - 1]
            m -= 1


@numba.njit(cache=True, nogil=True, inline="always")
def _pinv_top(matrix, rank, inverse, eig):
    """Moore–Penrose inverse of ``matrix`` from its ``rank`` largest eigenpairs; the log
    of their product (NaN if one is not positive)."""
    values, vectors, work, order, _ = eig
    p = matrix.shape[0]
    _eigh(matrix, values, vectors, work)
    _ascending(values, order, p)
    for i in range(p):
        for j in range(p):
            inverse[i, j] = 0.0
    log_pdet = 0.0
    for m in range(p - rank, p):
        e = order[m]
        value = values[e]
        log_pdet += math.log(value) if value > 0.0 else math.nan
        for i in range(p):
            scaled = vectors[i, e] / value
            for j in range(p):
                inverse[i, j] += scaled * vectors[j, e]
    return log_pdet


@numba.njit(cache=True, nogil=True, inline="always")
def _equilibrated(matrix, eig):
    """The eigenvalues of ``D^-1/2 M D^-1/2`` (``D`` the diagonal where positive, else
    1), ascending in ``values[order[:p]]``; whether every diagonal entry is positive."""
    values, vectors, work, order, scaled = eig
    p = matrix.shape[0]
    positive = True
    for i in range(p):
        positive = positive and matrix[i, i] > 0.0
        ri = math.sqrt(matrix[i, i]) if matrix[i, i] > 0.0 else 1.0
        for j in range(p):
            rj = math.sqrt(matrix[j, j]) if matrix[j, j] > 0.0 else 1.0
            scaled[i, j] = matrix[i, j] / ri / rj
    _eigh(scaled, values, vectors, work)
    _ascending(values, order, p)
    return positive


@numba.njit(cache=True, nogil=True, inline="always")
def _rank(matrix, eig):
    """:func:`bigglm.group.voxelwise.pinv_and_rank`'s rank of one PSD matrix."""
    values, order = eig[0], eig[3]
    p = matrix.shape[0]
    _equilibrated(matrix, eig)
    top = max(values[order[p - 1]], 1e-300)
    rank = 0
    for i in range(p):
        if values[i] > RANK_TOLERANCE * top:
            rank += 1
    return rank


# --- sums over subjects -------------------------------------------------------------

#: Floating-point flags of the sums over subjects: reassociation lets them use SIMD
#: lanes (NaN and infinity keep their IEEE meaning).
_SUMS = {"reassoc", "contract"}


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _dot(a, b, lo, hi):
    """``sum a[lo:hi] * b[lo:hi]``."""
    a, b = a[lo:hi], b[lo:hi]  # indices from 0 up: no wraparound test, so SIMD
    total = 0.0
    for i in range(a.size):
        total += a[i] * b[i]
    return total


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _residuals(y, design_t, beta, r):
    """``r = y - X beta``, column by column of the design (``design_t`` is ``X'``)."""
    for i in range(y.size):
        r[i] = y[i]
    for a in range(beta.size):
        b = beta[a]
        column = design_t[a]
        for i in range(y.size):
            r[i] -= column[i] * b


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _weighted_moments(w, r):
    """``(sum w r^2, sum w, sum w^2, sum (w r)^2, sum w (w r)^2)``."""
    quadratic, s1, s2, s3, s4 = 0.0, 0.0, 0.0, 0.0, 0.0
    for i in range(w.size):
        wi, ri = w[i], r[i]
        square = wi * wi
        wr2 = wi * ri * ri
        quadratic += wr2
        s1 += wi
        s2 += square
        s3 += square * ri * ri
        s4 += square * wr2
    return quadratic, s1, s2, s3, s4


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _power_dots(w, u):
    """``(sum w^2 u, sum w^3 u)``."""
    second, third = 0.0, 0.0
    for i in range(w.size):
        square = w[i] * w[i]
        second += square * u[i]
        third += square * w[i] * u[i]
    return second, third


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _pull_dot(w, r, x):
    """``sum w^2 r x``."""
    total = 0.0
    for i in range(w.size):
        total += w[i] * w[i] * r[i] * x[i]
    return total


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _quadratic(w, r):
    """``sum w r^2``."""
    total = 0.0
    for i in range(w.size):
        total += w[i] * r[i] * r[i]
    return total


@numba.njit(cache=True, nogil=True)
def _grams(weights, lo, hi, layout, gram):
    """``X' diag(weights) X`` over the subjects ``lo:hi`` into ``gram`` (both triangles),
    one dot product per upper-triangle entry of the row-wise outer products."""
    outer, rows, cols = layout.outer, layout.rows, layout.cols
    for q in range(rows.size):
        value = _dot(weights, outer[q], lo, hi)
        gram[rows[q], cols[q]] = value
        gram[cols[q], rows[q]] = value


@numba.njit(cache=True, nogil=True)
def _pulls(values, lo, hi, layout, out):
    """``X' values`` over the subjects ``lo:hi`` into ``out``."""
    for a in range(out.size):
        out[a] = _dot(values, layout.design_t[a], lo, hi)


# --- the start -----------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _start(y, s, bounds, layout, space, tau2, floor):
    """Moment estimates of ``tau2`` from OLS into ``tau2``, bounds into ``floor``, the
    subjects present per group into ``space.counts``; whether the voxel can be fitted,
    and the rank of its present subjects' design."""
    k, n = bounds.size - 1, y.size
    w, wy, r = space.w, space.wy, space.r
    counts, squares, sums, zero = space.counts, space.squares, space.variances, space.zero
    for g in range(k):
        counts[g], sums[g], zero[g] = 0, 0.0, False
        for i in range(bounds[g], bounds[g + 1]):
            present = s[i] != math.inf
            w[i] = 1.0 if present else 0.0
            wy[i] = y[i] if present else 0.0
            if present:
                counts[g] += 1
                sums[g] += s[i]
                zero[g] = zero[g] or s[i] == 0.0
    _grams(w, 0, n, layout, space.gram)
    _pulls(wy, 0, n, layout, space.xwy)
    rank = _rank(space.gram, space.eig_p)
    _pinv_top(space.gram, rank, space.inverse, space.eig_p)
    _matvec(space.inverse, space.xwy, space.beta)
    _residuals(y, layout.design_t, space.beta, r)
    for g in range(k):
        squares[g] = _quadratic(w[bounds[g] : bounds[g + 1]], r[bounds[g] : bounds[g + 1]])
    return _moment_start(counts, squares, sums, zero, rank, tau2, floor), rank


@numba.njit(cache=True, nogil=True)
def _moment_start(counts, squares, sums, zero, rank, tau2, floor):
    """Per group ``max(0, RSS_g * n / (n - rank) - sum s_g) / n_g`` into ``tau2`` (at least
    the bound, 0 for an empty group) and the bound into ``floor``; whether the voxel can
    be fitted (``n - rank >= 1`` and a scale)."""
    n = counts.sum()
    dof = n - rank
    scale = squares.sum() / dof + sums.sum() / n if dof > 0 else math.nan
    any_zero = False
    for g in range(counts.size):
        moment = 0.0
        if counts[g] > 0 and dof > 0:
            moment = max(0.0, (squares[g] * n / dof - sums[g]) / counts[g])
        floor[g] = ZERO_VARIANCE_FLOOR * scale if zero[g] and dof > 0 else 0.0
        tau2[g] = max(moment, floor[g]) if counts[g] > 0 else 0.0
        any_zero = any_zero or zero[g]
    return dof >= 1 and not (any_zero and not scale > 0.0)


@numba.njit(cache=True, nogil=True)
def _matvec(matrix, vector, out):
    """``out = matrix @ vector`` for a small square matrix."""
    p = vector.size
    for a in range(p):
        total = 0.0
        for b in range(p):
            total += matrix[a, b] * vector[b]
        out[a] = total


# --- the REML point ------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _weigh(tau2, s, y, w, wy):
    """``w = 1 / (tau2 + s)`` and ``w y`` over one group's subjects (0 where missing);
    how many present subjects have ``tau2 + s <= 0`` (no weight)."""
    bad = 0
    for i in range(s.size):
        total = tau2 + s[i]
        bad += total <= 0.0
        wi = 1.0 / total
        w[i] = wi
        wy[i] = wi * y[i]
    return bad


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _log_sum(tau2, s):
    """``sum log(tau2 + s_i)`` over the present subjects (``s`` finite): logs of products
    of 16 factors, factor by factor where a product leaves ``[1e-300, 1e300]``."""
    total = 0.0
    for start in range(0, s.size, 16):
        chunk = s[start : start + 16]
        product = 1.0
        for i in range(chunk.size):
            value = tau2 + chunk[i]
            product *= value if value != math.inf else 1.0
        if 1e-300 <= product <= 1e300:
            total += math.log(product)
        else:
            for i in range(chunk.size):
                value = tau2 + chunk[i]
                if value != math.inf:
                    total += math.log(value)
    return total


@numba.njit(cache=True, nogil=True)
def _gls(y, s, bounds, tau2, rank, layout, space, gram, beta):
    """Pass 1: weights (``space.w``), ``X'WX`` into ``gram``, its pinv (``space.inverse``)
    and ``beta``; returns ``sum log w - log pdet(X'WX)`` (NaN where a present subject's
    ``tau2 + s <= 0``)."""
    w, wy = space.w, space.wy
    logs, bad = 0.0, 0
    for g in range(bounds.size - 1):
        lo, hi = bounds[g], bounds[g + 1]
        bad += _weigh(tau2[g], s[lo:hi], y[lo:hi], w[lo:hi], wy[lo:hi])
        logs += _log_sum(tau2[g], s[lo:hi])
    _grams(w, 0, y.size, layout, gram)
    _pulls(wy, 0, y.size, layout, space.xwy)
    log_pdet = _pinv_top(gram, rank, space.inverse, space.eig_p)
    _matvec(space.inverse, space.xwy, beta)
    return math.nan if bad else -logs - log_pdet


@numba.njit(cache=True, nogil=True)
def _residual_sums(y, bounds, beta, layout, space, derivatives):
    """Pass 2: ``y'Py = sum w r^2`` and, with ``derivatives``, per group ``g``:
    ``sums[g] = (sum w, sum w^2, sum (w r)^2, sum w (w r)^2)``, ``second[g] = X'W^2 D_g X``,
    ``third[g] = X'W^3 D_g X`` and ``pull[g] = X'W D_g (W r)``."""
    w, r, sums = space.w, space.r, space.sums
    outer, rows, cols, design_t = layout.outer, layout.rows, layout.cols, layout.design_t
    _residuals(y, design_t, beta, r)
    quadratic = 0.0
    for g in range(bounds.size - 1):
        wg, rg = w[bounds[g] : bounds[g + 1]], r[bounds[g] : bounds[g + 1]]
        if not derivatives:
            quadratic += _quadratic(wg, rg)
            continue
        part, sums[g, 0], sums[g, 1], sums[g, 2], sums[g, 3] = _weighted_moments(wg, rg)
        quadratic += part
        second, third = space.second[g], space.third[g]
        for q in range(rows.size):
            a, b = rows[q], cols[q]
            second[a, b], third[a, b] = _power_dots(wg, outer[q, bounds[g] : bounds[g + 1]])
            second[b, a], third[b, a] = second[a, b], third[a, b]
        for a in range(design_t.shape[0]):
            space.pull[g, a] = _pull_dot(wg, rg, design_t[a, bounds[g] : bounds[g + 1]])
    return quadratic


@numba.njit(cache=True, nogil=True)
def _derivatives(space, score, fisher, observed, squares):
    """Score, Fisher and observed information of ``tau2`` from the pass-2 sums.

    With ``A^+ = (X'WX)^+``, ``B_g = X'W^2 D_g X``, ``C_g = X'W^3 D_g X``,
    ``u_g = X'W D_g (W r)`` and ``W r = P y``::

        tr(P D_g)         = sum_g w - tr(A+ B_g)
        y'P D_g P y       = sum_g (w r)^2
        tr(P D_g P D_h)   = delta_gh (sum_g w^2 - 2 tr(A+ C_g)) + tr(A+ B_g A+ B_h)
        y'P D_g P D_h P y = delta_gh sum_g w (w r)^2 - u_g' A+ u_h

    score ``= -1/2 (tr(P D_g) - y'P D_g P y)``, Fisher ``= 1/2 tr(P D_g P D_h)``,
    observed ``= y'P D_g P D_h P y - 1/2 tr(P D_g P D_h)``.
    """
    inverse, sums, pull, products = space.inverse, space.sums, space.pull, space.products
    second, third = space.second, space.third  # products: A+ B_g
    k, p = pull.shape
    for g in range(k):
        trace_b, trace_c = 0.0, 0.0
        for a in range(p):
            for b in range(p):
                total = 0.0
                for c in range(p):
                    total += inverse[a, c] * second[g, c, b]
                products[g, a, b] = total
                trace_c += inverse[a, b] * third[g, b, a]
            trace_b += products[g, a, a]
        score[g] = -0.5 * (sums[g, 0] - trace_b - sums[g, 2])
        squares[g] = sums[g, 1]
        own = sums[g, 1] - 2.0 * trace_c
        for h in range(g + 1):
            cross, spread = 0.0, 0.0
            for a in range(p):
                for b in range(p):
                    cross += products[g, a, b] * products[h, b, a]
                    spread += pull[g, a] * inverse[a, b] * pull[h, b]
            value = 0.5 * (cross + (own if g == h else 0.0))
            fisher[g, h] = value
            fisher[h, g] = value
            observed[g, h] = -value - spread + (sums[g, 3] if g == h else 0.0)
            observed[h, g] = observed[g, h]


@numba.njit(cache=True, nogil=True)
def _evaluate(y, s, bounds, tau2, rank, slot, layout, point, space, derivatives):
    """The REML point at ``tau2`` into ``slot`` of ``point``; its log-likelihood."""
    logs = _gls(y, s, bounds, tau2, rank, layout, space, point.gram[slot], point.beta[slot])
    point.quadratic[slot] = _residual_sums(y, bounds, point.beta[slot], layout, space, derivatives)
    point.loglik[slot] = -0.5 * (-logs + point.quadratic[slot])
    if derivatives:
        _derivatives(
            space, point.score[slot], point.fisher[slot], point.observed[slot], point.squares[slot]
        )
    return point.loglik[slot]


# --- the projected Newton step -------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _free_system(matrix, held, system):
    """``matrix`` on the free groups, the identity on the held ones, into ``system``."""
    k = held.size
    for g in range(k):
        for h in range(k):
            free = not held[g] and not held[h]
            system[g, h] = matrix[g, h] if free else (1.0 if g == h else 0.0)


@numba.njit(cache=True, nogil=True, inline="always")
def _face_newton(information, slope, held, segment, space):
    """The Newton step of the free groups, the held ones fixed: ``I_FF d_F = slope_F``."""
    k = held.size
    system, inverse = space.system, space.system_inverse
    _free_system(information, held, system)
    _pinv_top(system, _rank(system, space.eig_k), inverse, space.eig_k)
    for g in range(k):
        total = 0.0
        if not held[g]:
            for h in range(k):
                if not held[h]:
                    total += inverse[g, h] * slope[h]
        segment[g] = total


@numba.njit(cache=True, nogil=True, inline="always")
def _step(point, slot, tau2, floor, step, space):
    """The projected Newton (or scoring) step from ``tau2`` into ``step``.

    Groups at the bound whose score points below it, and groups without information,
    are held. The information is the observed one where it is positive definite on the
    free groups (exact Newton), else Fisher's (scoring). The step then climbs the
    quadratic model of the log-likelihood over the box ``tau2 >= floor`` as a primal
    active-set method does: a Newton step of the free groups, cut short where it meets a
    group's bound, that group held from there on, and again from the point reached (at
    most ``k`` segments). The model rises along every segment, so the step is an ascent
    direction and halving it can only help.
    """
    score, fisher, observed = point.score[slot], point.fisher[slot], point.observed[slot]
    k = tau2.size
    held, slope, segment, ratio = space.held, space.slope, space.segment, space.ratio
    for g in range(k):
        uninformed = fisher[g, g] <= NO_INFORMATION * 0.5 * point.squares[slot, g]
        held[g] = uninformed or (tau2[g] <= floor[g] and score[g] <= 0.0)
    system = space.system
    _free_system(observed, held, system)
    values, order = space.eig_k[0], space.eig_k[3]
    definite = _equilibrated(system, space.eig_k) and values[order[0]] > _DEFINITE
    information = observed if definite else fisher
    step[:] = 0.0
    for _ in range(k):
        for g in range(k):
            slope[g] = score[g]
            for h in range(k):
                slope[g] -= information[g, h] * step[h]
        _face_newton(information, slope, held, segment, space)
        length = 1.0
        for g in range(k):
            down = not held[g] and segment[g] < 0.0
            ratio[g] = (floor[g] - tau2[g] - step[g]) / segment[g] if down else math.inf
            length = min(length, ratio[g])
        blocked_any = False
        for g in range(k):
            if ratio[g] <= length and length < 1.0:  # ratio is finite only when down
                step[g] = floor[g] - tau2[g]
                held[g] = True
                blocked_any = True
            else:
                step[g] += length * segment[g]
        if not blocked_any:
            break
    for g in range(k):
        step[g] = max(floor[g], tau2[g] + step[g]) - tau2[g]


# --- the iteration -------------------------------------------------------------------


#: Work arrays of one block's voxels (``n`` subjects, ``P`` columns, ``k`` groups).
_Workspace = namedtuple(
    "_Workspace",
    "w wy r gram inverse xwy beta sums second third pull products counts "
    "squares variances zero held slope segment ratio system system_inverse eig_p eig_k",
)

#: The design as the sums read it: ``design_t`` (P, n) is ``X'``; ``outer`` (Q, n) the
#: row-wise products ``x_a x_b`` of the ``Q = P (P + 1) / 2`` pairs ``rows[q] <= cols[q]``.
_Layout = namedtuple("_Layout", "design_t outer rows cols")

#: Two slots of a voxel's REML point: log-likelihood, ``y'Py``, ``beta``, ``X'WX``,
#: score, Fisher and observed informations, ``sum w^2`` per group.
_Point = namedtuple("_Point", "loglik quadratic beta gram score fisher observed squares")


@numba.njit(cache=True, nogil=True)
def _workspace(n, p, k):
    """A :data:`_Workspace` (``eig_p``, ``eig_k``: values, vectors, work, order and a
    scaled copy, for the ``P x P`` and ``k x k`` matrices)."""
    return _Workspace(
        np.empty(n), np.empty(n), np.empty(n), np.empty((p, p)),
        np.empty((p, p)), np.empty(p), np.empty(p),
        np.empty((k, 4)), np.empty((k, p, p)), np.empty((k, p, p)), np.empty((k, p)),
        np.empty((k, p, p)), np.empty(k, dtype=np.int64), np.empty(k), np.empty(k),
        np.empty(k, dtype=np.bool_), np.empty(k, dtype=np.bool_), np.empty(k), np.empty(k),
        np.empty(k), np.empty((k, k)), np.empty((k, k)), _eigen_space(p), _eigen_space(k),
    )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def _eigen_space(m):
    """Work arrays of :func:`_eigh` and its callers for ``m x m`` matrices."""
    square = (m, m)
    return np.empty(m), np.empty(square), np.empty(square), np.empty(m, np.int64), np.empty(square)


@numba.njit(cache=True, nogil=True)
def _layout(x):
    """The :data:`_Layout` of a design ``x (n, P)``."""
    n, p = x.shape
    q = p * (p + 1) // 2
    rows, cols = np.empty(q, dtype=np.int64), np.empty(q, dtype=np.int64)
    outer = np.empty((q, n))
    m = 0
    for a in range(p):
        for b in range(a, p):
            rows[m], cols[m] = a, b
            for i in range(n):
                outer[m, i] = x[i, a] * x[i, b]
            m += 1
    return _Layout(np.ascontiguousarray(x.T), outer, rows, cols)


@numba.njit(cache=True, nogil=True)
def _point(p, k):
    """An empty :data:`_Point`."""
    return _Point(
        np.empty(2), np.empty(2), np.empty((2, p)), np.empty((2, p, p)), np.empty((2, k)),
        np.empty((2, k, k)), np.empty((2, k, k)), np.empty((2, k)),
    )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def fit_block(y, s, x, bounds, typical, max_iter, tolerance, out):
    """Start, REML and GLS at every voxel of a block, one voxel at a time.

    Parameters
    ----------
    y, s : (v, n) float64
        Effects and first-level variances (:func:`voxel_major`), subjects sorted by
        variance group; a missing subject has ``s = inf``.
    x : (n, P) float64, C-contiguous
    bounds : (k + 1,) int64
        Group ``g``'s subjects are ``bounds[g]:bounds[g + 1]``.
    typical : (v,) float64
        The convergence scale of each voxel (the median of its present variances).
    max_iter : int
    tolerance : float
    out : tuple
        ``beta (v, P)``, ``gram (v, P, P)``, ``tau2 (v, k)``, ``quadratic (v,)``,
        ``converged (v,)``, ``iterations (v,)``, ``rank (v,)``, ``counts (v, k)``,
        ``fitted (v,)``, set in place (the first four only where fitted).
    """
    n, p, k = x.shape[0], x.shape[1], bounds.size - 1
    layout, space, point = _layout(x), _workspace(n, p, k), _point(p, k)
    tau2, floor, candidate, step = np.empty(k), np.empty(k), np.empty(k), np.empty(k)
    beta, gram, tau2_out, quadratic, converged, iterations, ranks, counts, fitted = out
    for v in range(y.shape[0]):
        fitted[v], rank = _start(y[v], s[v], bounds, layout, space, tau2, floor)
        ranks[v] = rank
        counts[v] = space.counts
        if not fitted[v]:
            continue
        slot, converged[v], iterations[v] = _iterate(
            y[v], s[v], bounds, tau2, floor, candidate, step, typical[v], rank, max_iter,
            tolerance, layout, point, space,
        )  # fmt: skip
        beta[v] = point.beta[slot]
        gram[v] = point.gram[slot]
        tau2_out[v] = tau2
        quadratic[v] = point.quadratic[slot]


@numba.njit(cache=True, nogil=True)
def _iterate(
    y, s, bounds, tau2, floor, candidate, step, typical, rank, max_iter, tolerance, layout,
    point, space,
):  # fmt: skip
    """Projected Newton with step halving at one voxel: the final point's slot, whether
    it converged, and the iterations taken (``tau2`` is updated in place)."""
    slot = 0
    _evaluate(y, s, bounds, tau2, rank, slot, layout, point, space, True)
    _step(point, slot, tau2, floor, step, space)
    for iteration in range(max_iter + 1):
        small = True
        for g in range(tau2.size):
            small = small and abs(step[g]) <= tolerance * (tau2[g] + typical)
        if small or iteration == max_iter:
            return slot, small, iteration
        for g in range(tau2.size):  # exactly on the bound when stepping to it
            candidate[g] = max(floor[g], tau2[g] + step[g])
        trial = 1 - slot
        value = _evaluate(y, s, bounds, candidate, rank, trial, layout, point, space, True)
        if value >= point.loglik[slot] - ASCENT_SLACK * (1.0 + abs(point.loglik[slot])):
            slot = trial
            tau2[:] = candidate
            _step(point, slot, tau2, floor, step, space)
        else:
            step *= 0.5
    return slot, False, max_iter


@numba.njit(cache=True, nogil=True)
def loglik_block(y, s, x, bounds, tau2, loglik):
    """The REML log-likelihood at ``tau2 (v, k)`` of every voxel into ``loglik (v,)``
    (arrays as for :func:`fit_block`; the design's rank that of the present subjects)."""
    n, p, k = x.shape[0], x.shape[1], bounds.size - 1
    layout, space, point = _layout(x), _workspace(n, p, k), _point(p, k)
    start, floor = np.empty(k), np.empty(k)
    for v in range(y.shape[0]):
        rank = _start(y[v], s[v], bounds, layout, space, start, floor)[1]
        loglik[v] = _evaluate(y[v], s[v], bounds, tau2[v], rank, 0, layout, point, space, False)
