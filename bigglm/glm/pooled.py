"""SPM's AR(0.2) noise model (``noise="spm-ar1"``): one covariance pooled over the brain.

SPM12's default serial-correlation option ('AR(1)') whitens every voxel with the same
matrix ``W = V^(-1/2)``; ``V`` is estimated once, by ReML (:mod:`bigglm.glm.reml`), from the
data of the voxels the effects of interest drive. That takes two passes over the data,
both blockwise and out of core:

1. **Selection and pooled covariance** (``spm_est_non_sphericity``). Each voxel block is
   read with all its scans (the store's time chunks are joined per block, so memory is one
   block of whole time series per run, about 64 MiB by default). Per voxel: the OLS fit of
   the design, and the F statistic of the *effects of interest*: every column except the
   high-pass set (columns named ``drift_*``, SPM's ``K.X0``) and the session constants
   (constant columns, SPM's ``iB``). A voxel whose F exceeds SPM's critical value at
   ``UFp = 0.001`` (``spm_invFcdf(1 - UFp, [trMV, trRV])``, with SPM's ``trRV = n -
   rank(K X)`` of this pass) adds its raw series to ``Cy``, weighted by ``trRV / RSS``;
   ``Cy`` is divided by the number of voxels selected. With several runs (SPM's sessions),
   F adds the runs' sums of squares, and each run's block of ``Cy`` is kept.
2. **ReML, then the whitened fit** (``spm_spm``). Per run, ReML of ``Cy``'s block with the
   run's design (high-pass set included) and SPM's two AR(0.2) components; the estimates
   are scaled so that ``trace(V)`` is the number of scans over all runs. SPM then fits
   ``K W Y`` on ``K W X`` with ``W = V^(-1/2)``; by Frisch–Waugh–Lovell that is ``W Y`` on
   ``[W X, X0]`` (its filter ``K`` projects the unwhitened ``X0`` out after whitening).
   bigglm reads the data a second time, in blocks of whole series, and gives its one-pass
   engine the same normal equations at a fraction of the cost: ``Z = L^-1 Y`` with
   ``V = L L'`` (``V`` is banded, lags up to 5, so this is a banded triangular solve per
   voxel, not a dense ``n x n`` product) on ``X_z = [L^-1 X, L' W X0]`` (see
   :func:`_whiten`). Betas and residual sums of squares are SPM's; the residual variance is
   ``RSS / trRV`` and the degrees of freedom ``trRV^2 / trRVRV``, computed as SPM does from
   ``K W V W' K``. The result keeps the unwhitened design as ``model_design`` (residuals
   ``Y - X beta`` use it).

Differences from SPM that remain: SPM zeroes ``W``'s entries below 1e-6 before fitting;
bigglm fits with the exact ``V^-1`` (and computes trRV with SPM's zeroed ``W``), about
1e-7 of a t map's peak on the localizer. SPM's own analysis mask (voxels below 80%
of the global in any scan are dropped, ``xM.TH``) is not applied: the store's voxels are
fitted, so give ``bigglm.convert`` the mask SPM used to compare voxel for voxel.
Several runs are fitted as bigglm runs (fixed effects over runs at contrast time) where
SPM fits one concatenated model with one residual variance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from operator import getitem
from typing import TYPE_CHECKING, Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.linalg
import xarray as xr
from dask.base import tokenize
from numpy.typing import NDArray
from scipy import stats

from bigglm.exceptions import DesignError
from bigglm.glm.graphs import with_inputs
from bigglm.glm.reml import ar_components, reml, whitening_matrix

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["SPM_UFP", "WhitenedRun", "spm_ar1_runs", "whole_series"]

logger = logging.getLogger(__name__)

Array = NDArray[np.float64]

#: SPM's default threshold for voxels entering the pooled covariance (stats.fmri.ufp).
SPM_UFP = 0.001
#: Bytes of whole time series read per voxel block in the selection pass (all runs).
BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class _RunPlan:
    """One run's projections for the selection pass (from its design alone)."""

    full: Array  # orthonormal basis of the whole design
    interest: Array  # of the effects of interest, with constants and drifts projected out
    rank_filtered: int  # rank(K X): the design's rank less the high-pass set's
    spans_constant: bool  # then each voxel's mean can be taken out first (no cancellation)

    @classmethod
    def build(cls, frame: pd.DataFrame) -> _RunPlan:
        x = frame.to_numpy(dtype=np.float64)
        drift = np.array([str(c).startswith("drift_") for c in frame.columns])
        constant = np.all(x == x[:1], axis=0) & np.any(x != 0, axis=0)
        nuisance = _basis(x[:, drift | constant])
        interest = x[:, ~(drift | constant)]
        interest = _basis(interest - nuisance @ (nuisance.T @ interest))
        full = _basis(x)
        ones = np.ones(len(x))
        spans = bool(np.allclose(full @ (full.T @ ones), ones, rtol=0, atol=1e-8))
        return cls(full, interest, full.shape[1] - _basis(x[:, drift]).shape[1], spans)


def _basis(x: Array) -> Array:
    """An orthonormal basis of the columns of ``x`` (numerical rank as numpy counts it)."""
    if x.shape[1] == 0:
        return np.zeros((x.shape[0], 0))
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    tol = np.max(s, initial=0.0) * max(x.shape) * np.finfo(np.float64).eps
    return np.asarray(u[:, s > tol], dtype=np.float64)


@dataclass(frozen=True)
class WhitenedRun:
    """A run made ready for the engine: ``W Y`` and ``[W X, X0]``, with SPM's dof.

    Attributes
    ----------
    dataset : xarray.Dataset
        The run with ``bold`` replaced by the lazy ``W @ bold``.
    design : pandas.DataFrame
        The design with every column but the high-pass set whitened.
    residual_dof : float
        SPM's ``trRV``: the residual variance is ``RSS / trRV``.
    dof : float
        SPM's effective degrees of freedom ``trRV^2 / trRVRV``.
    summary : dict
        JSON-ready facts of the estimate (hyperparameters, voxels pooled, threshold).
    """

    dataset: xr.Dataset
    design: pd.DataFrame
    residual_dof: float
    dof: float
    summary: dict[str, Any]


def spm_ar1_runs(
    datasets: Sequence[xr.Dataset],
    frames: Sequence[pd.DataFrame],
    *,
    client: Client | None = None,
    ufp: float = SPM_UFP,
) -> list[WhitenedRun]:
    """Estimate SPM's pooled AR(0.2) covariance (one pass) and whiten each run lazily.

    Parameters
    ----------
    datasets : sequence of xarray.Dataset
        Runs with a dask-backed ``bold`` (time, voxel), the same voxels in each.
    frames : sequence of pandas.DataFrame
        One design per run; the high-pass set in columns named ``drift_*``.
    client : distributed.Client, optional
        Where the selection pass is computed (Dask's default otherwise).
    ufp : float
        The F-test p value a voxel must pass to enter the pooled covariance.

    Returns
    -------
    list of WhitenedRun

    Raises
    ------
    DesignError
        If no voxel passes the selection, or ReML cannot identify the covariance.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> t = np.arange(80.0)
    >>> x = pd.DataFrame({"task": np.sin(t / 4), "constant": 1.0})
    >>> y = 100 + np.outer(x["task"], rng.uniform(1, 3, 300)) + rng.normal(size=(80, 300))
    >>> ds = xr.Dataset({"bold": (("time", "voxel"), da.from_array(y, chunks=(40, 100)))})
    >>> run = spm_ar1_runs([ds], [x])[0]
    >>> run.summary["voxels_pooled"] > 250, round(run.dof, 1)
    (True, 78.0)
    """
    if not 0 < ufp < 1:
        raise ValueError(f"ufp={ufp} is not a p value; SPM's default is {SPM_UFP}")
    plans = [_RunPlan.build(frame) for frame in frames]
    covariances, n_pooled, flat = _pooled_covariance(datasets, plans, ufp, client)
    n_total = sum(frame.shape[0] for frame in frames)
    estimates = [
        reml(cy, frame.to_numpy(dtype=np.float64), ar_components(frame.shape[0]))
        for cy, frame in zip(covariances, frames, strict=True)
    ]
    scale = n_total / sum(float(np.trace(v)) for v, _ in estimates)
    logger.info("SPM AR(0.2): covariance pooled over %d voxels, scaled by %.4g", n_pooled, scale)
    return [
        _whiten(ds, frame, v * scale, h, n_pooled, constant)
        for ds, frame, (v, h), constant in zip(datasets, frames, estimates, flat, strict=True)
    ]


class _Pool(NamedTuple):
    """What the selection pass adds up: per run ``Cy`` (unnormalised), the voxels pooled,
    and per run the indices of the voxels constant in time (no residual variance)."""

    parts: list[Array]
    n_pooled: int
    flat: list[NDArray[np.int64]]


def _pooled_covariance(
    datasets: Sequence[xr.Dataset], plans: list[_RunPlan], ufp: float, client: Client | None
) -> tuple[list[Array], int, list[NDArray[np.int64]]]:
    """Per run, ``Cy`` averaged over the voxels selected by the pooled F test, the number
    of those voxels, and per run the voxels constant in time."""
    trmv = sum(p.interest.shape[1] for p in plans)
    trrv = sum(p.full.shape[0] - p.rank_filtered for p in plans)
    critical = float(stats.f.isf(ufp, trmv, trrv)) if trmv else -np.inf
    n_scans = sum(ds.sizes["time"] for ds in datasets)
    arrays = [whole_series(ds["bold"].data, n_scans) for ds in datasets]
    starts = np.concatenate([[0], np.cumsum(arrays[0].chunks[1])[:-1]]).astype(int).tolist()
    blocks = zip(*(a.to_delayed()[0] for a in arrays), strict=True)
    part = dask.delayed(_pooled_block, pure=True)
    parts = [
        part(list(b), plans, critical, trmv, trrv, start)
        for b, start in zip(blocks, starts, strict=True)
    ]
    total = _tree_sum(parts)
    pool = client.compute(total).result() if client else dask.compute(total)[0]
    if pool.n_pooled == 0:
        raise DesignError(
            f"no voxel passes SPM's effects-of-interest F test at UFp={ufp} (F > "
            f"{critical:.3g} on {trmv} and {trrv} dof), over which SPM's AR(0.2) model pools "
            "its covariance; check the design's columns, or use noise='ar1'"
        )
    return [c / pool.n_pooled for c in pool.parts], int(pool.n_pooled), pool.flat


def _pooled_block(
    blocks: list[Array],
    plans: list[_RunPlan],
    critical: float,
    trmv: int,
    trrv: int,
    start: int,
) -> _Pool:
    """One voxel block's contribution (its first voxel is ``start``).

    Taken :data:`_SLAB` voxels at a time, so the float64 copies are small and reused by the
    allocator instead of freshly mapped (which costs more than the arithmetic)."""
    n_voxels = blocks[0].shape[1]
    pool = _Pool([np.zeros((b.shape[0], b.shape[0])) for b in blocks], 0, [])
    flat: list[list[NDArray[np.int64]]] = [[] for _ in blocks]
    for lo in range(0, n_voxels, _SLAB):
        ys = [np.asarray(b[:, lo : lo + _SLAB], dtype=np.float64) for b in blocks]
        chosen, weights, constant = _selected(ys, plans, critical, trmv, trrv)
        for part, y in zip(pool.parts, ys, strict=True):
            scaled = y[:, chosen] * weights
            part += scaled @ scaled.T
        for run, mask in enumerate(constant):
            flat[run].append(start + lo + np.flatnonzero(mask))
        pool = pool._replace(n_pooled=pool.n_pooled + int(chosen.sum()))
    return pool._replace(flat=[np.concatenate(f).astype(np.int64) for f in flat])


#: Voxels per slab of :func:`_pooled_block`.
_SLAB = 2048


def _selected(
    ys: list[Array], plans: list[_RunPlan], critical: float, trmv: int, trrv: int
) -> tuple[NDArray[np.bool_], Array, list[NDArray[np.bool_]]]:
    """The voxels whose pooled F passes SPM's threshold, their weights ``sqrt(trRV/RSS)``,
    and per run the voxels constant in time."""
    rss = np.zeros(ys[0].shape[1])
    ess = np.zeros_like(rss)
    constant = []
    for y, plan in zip(ys, plans, strict=True):
        constant.append(np.all(y == y[:1], axis=0))
        # RSS = |y|^2 - |Q'y|^2, of the series less its mean when the design spans it
        centred = y - y.mean(axis=0) if plan.spans_constant else y
        fitted = plan.full.T @ centred
        rss += np.einsum("tv,tv->v", centred, centred) - np.einsum("kv,kv->v", fitted, fitted)
        effect = plan.interest.T @ centred
        ess += np.einsum("kv,kv->v", effect, effect)
    finite = np.isfinite(rss) & np.isfinite(ess) & (rss > 0) & ~np.any(constant, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        chosen = finite & (ess / max(trmv, 1) > critical * rss / trrv)
    return chosen, np.sqrt(trrv / rss[chosen]), constant


def whole_series(array: da.Array, n_scans: int) -> da.Array:
    """``array`` in blocks of whole time series: the store's own voxel blocks when
    ``n_scans`` rows of them fit in about :data:`BLOCK_BYTES` (float64), else a divisor of
    them that does, so every block is gathered from whole store chunks."""
    chunk = max(array.chunks[1])
    limit = max(1, BLOCK_BYTES // (8 * n_scans))
    width = chunk if chunk <= 2 * limit else -(-chunk // -(-chunk // limit))
    return array.rechunk({0: -1, 1: width})


def _tree_sum(parts: list[Any]) -> Any:
    """Add delayed pools pairwise, so no task holds them all."""
    add = dask.delayed(_add, pure=True)
    while len(parts) > 1:
        pairs = [parts[i : i + 2] for i in range(0, len(parts), 2)]
        parts = [add(*pair) if len(pair) == 2 else pair[0] for pair in pairs]
    return parts[0]


def _add(a: _Pool, b: _Pool) -> _Pool:
    return _Pool(
        [x + y for x, y in zip(a.parts, b.parts, strict=True)],
        a.n_pooled + b.n_pooled,
        [np.concatenate([x, y]) for x, y in zip(a.flat, b.flat, strict=True)],
    )


def _whiten(
    ds: xr.Dataset,
    frame: pd.DataFrame,
    v: Array,
    h: Array,
    n_pooled: int,
    constant: NDArray[np.int64],
) -> WhitenedRun:
    """The run as the engine fits it, with SPM's trRV and effective dof.

    SPM fits ``W Y`` on ``[W X, X0]``. With ``V = L L'`` (banded Cholesky: ``V`` has the
    band of its AR components), ``Z = L^-1 Y`` and ``X_z = [L^-1 X, L' W X0]`` give the same
    normal equations and residual sum of squares (``X_z' Z = [X' V^-1 Y, X0' W Y]``,
    ``X_z' X_z = [W X, X0]' [W X, X0]``, ``|Z|^2 = Y' V^-1 Y``), so each voxel costs a banded
    triangular solve instead of a dense ``n x n`` product."""
    drift = np.array([str(c).startswith("drift_") for c in frame.columns])
    x = frame.to_numpy(dtype=np.float64)
    band = _bandwidth(v)
    lower = scipy.linalg.cholesky_banded(_lower_bands(v, band), lower=True)
    root = _symmetric_root_inverse(v)
    design = x.copy()
    design[:, ~drift] = scipy.linalg.solve_banded((band, 0), lower, x[:, ~drift])
    dense_lower = _dense_lower(lower, band)
    design[:, drift] = dense_lower.T @ (root @ x[:, drift])
    trrv, trrvrv = _effective_traces(whitening_matrix(v), v, x[:, ~drift], x[:, drift])
    bold = ds["bold"]
    data = bold.data if bold.chunks is not None else da.from_array(bold.values)
    solved = _forward_substitution(data, lower, band, constant)
    out = ds.copy()
    out["bold"] = xr.DataArray(solved, dims=bold.dims, coords=bold.coords, attrs=bold.attrs)
    summary = {
        "form": "AR(0.2)",
        "hyperparameters": [float(value) for value in h],
        "voxels_pooled": n_pooled,
        "trRV": trrv,
        "trRVRV": trrvrv,
    }
    fitted = pd.DataFrame(design, index=frame.index, columns=frame.columns)
    return WhitenedRun(out, fitted, trrv, trrv**2 / trrvrv, summary)


def _bandwidth(v: Array) -> int:
    """The largest ``|i - j|`` with ``V[i, j] != 0``."""
    rows, cols = np.nonzero(v)
    return int(np.abs(rows - cols).max(initial=0))


def _lower_bands(v: Array, band: int) -> Array:
    """LAPACK lower band storage: ``ab[k, j] = V[j + k, j]``."""
    n = len(v)
    ab = np.zeros((band + 1, n))
    for k in range(band + 1):
        ab[k, : n - k] = np.diagonal(v, -k)
    return ab


def _dense_lower(ab: Array, band: int) -> Array:
    """The lower triangular matrix of its band storage."""
    n = ab.shape[1]
    out = np.zeros((n, n))
    for k in range(band + 1):
        out += np.diag(ab[k, : n - k], -k)
    return out


def _symmetric_root_inverse(v: Array) -> Array:
    """``V^(-1/2)``, the symmetric root (not zeroed below 1e-6, so ``W V W = I``)."""
    values, vectors = np.linalg.eigh(v)
    return np.asarray((vectors / np.sqrt(values)) @ vectors.T, dtype=np.float64)


def _forward_substitution(
    data: da.Array, lower: Array, band: int, constant: NDArray[np.int64]
) -> da.Array:
    """``L^-1 Y`` lazily, in the data's own chunks: each time chunk's task takes the last
    ``band`` solved scans before it from the task of the chunk before, a chain along time
    per voxel block, so the series are never gathered whole (no rechunk) and every chunk
    is read once. The voxels ``constant`` in time get zeros (the engine then marks them
    constant, as it does unwhitened constant series)."""
    token = tokenize(data.name, lower, band, constant)
    name, chained = f"spm-ar1-whiten-{token}", f"spm-ar1-chain-{token}"
    starts = np.concatenate([[0], np.cumsum(data.chunks[0])[:-1]]).astype(int).tolist()
    edges = np.cumsum([0, *data.chunks[1]])
    layer: dict[Any, Any] = {}
    for j in range(len(data.chunks[1])):
        inside = constant[(constant >= edges[j]) & (constant < edges[j + 1])] - edges[j]
        previous = None
        for i, start in enumerate(starts):
            link = (chained, i, j)
            task = (_solve_chunk, (data.name, i, j), previous, lower, band, start, inside)
            layer[link] = task
            layer[(name, i, j)] = (getitem, link, 0)
            previous = (getitem, link, 1)
    return da.Array(with_inputs(layer, data), name, data.chunks, dtype=np.float64)


def _solve_chunk(
    block: Array,
    before: Array | None,
    lower: Array,
    band: int,
    start: int,
    constant: NDArray[np.int64],
) -> tuple[Array, Array]:
    """Rows ``start..`` of ``L^-1 Y`` by forward substitution, and the last ``band`` solved
    rows so far, given those of the chunks before (``None`` for the first chunk). Each
    scan is a combination of at most ``band`` earlier ones, for all voxels at once (a
    LAPACK banded solve goes column by column and is several times slower here)."""
    tail = np.zeros((0, block.shape[1])) if before is None else before
    head = len(tail)
    z = np.concatenate([tail, np.asarray(block, dtype=np.float64)])
    for row in range(head, len(z)):
        t = start + row - head  # the scan's index in the run
        earlier = np.arange(max(0, t - band), t)
        if earlier.size:
            z[row] -= lower[t - earlier, earlier] @ z[row - earlier.size : row]
        z[row] /= lower[0, t]
    z[:, constant] = 0.0
    return z[head:], z[max(0, len(z) - band) :]


def _effective_traces(w: Array, v: Array, x: Array, x0: Array) -> tuple[float, float]:
    """SPM's ``trace(RV)`` and ``trace(RVRV)`` for ``V = K W V W' K`` and ``R`` the residual
    former of ``K W X`` (spm_SpUtil 'trRV')."""
    n = len(v)
    k = np.eye(n) - (x0 @ np.linalg.pinv(x0) if x0.shape[1] else 0.0)
    kwx = k @ w @ x
    r = np.eye(n) - kwx @ np.linalg.pinv(kwx)
    rv = r @ (k @ w @ v @ w.T @ k)
    return float(np.trace(rv)), float(np.sum(rv * rv.T))
