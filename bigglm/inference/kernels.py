"""Compiled reductions of the permutation engine (numba, ``nogil`` for Dask's threads).

A batch of rearrangements gives a ``(B, k, v)`` array of products; turning them into t
values and reducing those (the maximum per rearrangement, the exceedance count per
voxel) in numpy takes about ten passes over a ``B x v`` float64 array, which for a
study of 100 subjects costs several times the matrix product itself. One compiled pass
does it without storing the t values.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["reduce_batch"]


@numba.njit(cache=True, nogil=True)
def reduce_batch(products, scale, rss, aa, dof, known, floor, two_sided, count, maxima):
    """Add each voxel's rearrangements at least ``floor`` to ``count``; row maxima.

    Parameters
    ----------
    products : (B, k, v) float32 or float64
    scale, rss, aa, dof : (v,) float64
        The block's constants (``permutation._Block``).
    known : (v,) or (0,) float64
        The variance of the effect where it is known (mixed-effects score), else empty.
    floor : (v,) float64
        The observed statistic less the tie tolerance.
    two_sided : bool
        Reduce ``|t|``.
    count : (v,) int64
        Incremented in place.
    maxima : (B,) float64
        Set in place: each rearrangement's largest statistic (``-inf`` when none).
    """
    rows, k, voxels = products.shape
    has_known = known.size > 0
    for b in range(rows):
        top = -np.inf
        for v in range(voxels):
            # t as permutation._t_values computes it (products times x, not powers:
            # a power is a call to pow in the compiled loop, ten times slower)
            effect = products[b, 0, v] * scale[v]
            if has_known:
                t = effect / math.sqrt(known[v])
            else:
                residual = rss[v] - effect * effect / aa[v]
                for j in range(1, k):
                    x = np.float64(products[b, j, v])
                    residual -= x * x
                residual = max(residual, 0.0)
                denominator = math.sqrt(residual / dof[v] * aa[v])
                if denominator > 0.0:
                    t = effect / denominator
                elif effect != 0.0:
                    t = math.copysign(math.inf, effect)
                else:
                    t = math.nan  # no dof left: never exceeds, never the maximum
            if two_sided:
                t = abs(t)
            if t >= floor[v]:
                count[v] += 1
            if t > top:
                top = t
        maxima[b] = top


@numba.njit(cache=True, nogil=True)
def reduce_monotone(products, factor, floor, group, two_sided, count, top):
    """:func:`reduce_batch` for statistics that are monotone in ``products * factor``.

    Without nuisance columns (``k = 1``) t is ``r sqrt(dof) / sqrt(1 - r^2)`` with
    ``r = effect / sqrt(rss a'a)``, increasing in ``r`` for a given dof; the mixed-effects
    score is ``r`` itself. So the comparisons and maxima need only ``r``: one product per
    value, no square root or division (four times faster than :func:`reduce_batch`).

    Parameters
    ----------
    products : (B, v) float32 or float64
    factor : (v,) float64
        ``r = products * factor`` (NaN where the voxel cannot be tested).
    floor : (v,) float64
        The observed statistic less the tie tolerance, as ``r``.
    group : (v,) int64
        Each voxel's dof group (voxels of one group share the map from ``r`` to t).
    two_sided : bool
        Reduce ``|r|``.
    count : (v,) int64
        Incremented in place where ``r >= floor``.
    top : (B, G) float64
        Set in place: each rearrangement's largest ``r`` per group (``-inf``: none).
    """
    rows, voxels = products.shape
    single = top.shape[1] == 1
    for b in range(rows):
        best = -np.inf
        for v in range(voxels):
            r = products[b, v] * factor[v]
            if two_sided:
                r = abs(r)
            if r >= floor[v]:
                count[v] += 1
            if single:
                if r > best:
                    best = r
            elif r > top[b, group[v]]:
                top[b, group[v]] = r
        if single:
            top[b, 0] = best
