"""Fitting a group model to every voxel of a group store, out of core.

Every voxel is fitted with exactly the subjects present there, so every voxel has its own
design ``X_v`` (the rows of the subjects present), rank, dof and information matrix.

- ``model="ols"``, one pass: per chunk (subject block x voxel block) the sufficient
  statistics ``X_v'X_v`` (the design's row-wise outer products times the presence
  matrix, one matrix product), ``X_v'y_v``, ``y_v'y_v`` and ``n_v``, in float64; summed
  over subject blocks by a tree reduction; then per voxel ``b = (X'X)^+ X'y``,
  ``RSS = y'y - b'X'y``, ``dof = n - rank`` and ``sigma2 = RSS / dof``. A task holds one
  chunk and one voxel block's statistics, whatever the number of subjects.
- ``model="mixed"``: a voxel block's subjects are gathered (the REML iterations need them
  together; :mod:`bigglm.group.mixed`), with the block sized to a memory budget
  (:data:`MIXED_BLOCK_BYTES`).

A voxel is fitted when at least ``min_subjects`` subjects cover it and its dof is at
least 1; other voxels are NaN (their ``n`` is kept) and counted in the result's attrs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import xarray as xr

from bigglm.design.diagnostics import matrix_rank
from bigglm.exceptions import DesignError
from bigglm.group.voxelwise import outer_rows, pinv_and_rank
from bigglm.typing import GroupModel, ProgressCallback

if TYPE_CHECKING:
    from dask.delayed import Delayed
    from distributed import Client

    from bigglm.group.result import GroupResult

__all__ = ["MIXED_BLOCK_BYTES", "OLS_BLOCK_BYTES", "aligned_design", "fit", "subject_by_voxel"]

logger = logging.getLogger(__name__)

#: Bytes of per-voxel statistics an OLS task holds (``P x P`` float64 per voxel).
OLS_BLOCK_BYTES = 64 * 2**20

#: Bytes of subject x voxel data a mixed-effects task holds: effect and variance as read
#: (float32) and gathered, then their voxel-major float64 copies for the compiled REML,
#: about 24 bytes per subject and voxel; 56 are budgeted (:func:`_tasks`), for headroom.
MIXED_BLOCK_BYTES = 256 * 2**20

_MODELS: tuple[GroupModel, ...] = ("ols", "mixed")


def fit(
    store: str | os.PathLike[str] | xr.Dataset,
    design: pd.DataFrame,
    *,
    model: GroupModel = "ols",
    min_subjects: int | float | None = None,
    variance_groups: str | pd.Series | None = None,
    knapp_hartung: bool = False,
    client: Client | None = None,
    progress: ProgressCallback | None = None,
) -> GroupResult:
    """Fit a group model at every voxel, with the subjects present at each.

    Parameters
    ----------
    store : path or xarray.Dataset
        A group store (:func:`bigglm.group.collect`) or its Dataset
        (:func:`bigglm.group.open_group`; any Dataset with ``effect(subject, voxel)``,
        and ``variance`` for mixed effects).
    design : pandas.DataFrame
        One row per subject, indexed by the store's subject labels (any order); one
        column per regressor (:func:`bigglm.group.design`).
    model : {"ols", "mixed"}
        Ordinary least squares, or mixed effects with the first-level variances
        (``var(y_i) = tau2 + s_i``, tau2 by REML per voxel).
    min_subjects : int or float, optional
        Voxels covered by fewer subjects are not fitted (NaN). An int is a count, a
        float in (0, 1] a fraction of the store's subjects. Default: the design's rank
        plus 2 (so that every fitted voxel has at least 2 residual dof).
    variance_groups : str or pandas.Series, optional
        Mixed effects only: a separate tau2 per group of subjects (as FSL FLAME's
        variance groups): a design column name or a Series indexed by subject.
    knapp_hartung : bool
        Mixed effects only: scale each voxel's covariance by the Knapp–Hartung factor.
    client : distributed.Client, optional
        Where the voxel blocks are computed (default: Dask's default scheduler).
    progress : callable, optional
        Called with ``(done, total)`` voxel blocks.

    Returns
    -------
    GroupResult
        Computed, in memory: ``beta``, ``gram``, ``sigma2``, ``dof``, ``n``, ``rank``
        per voxel (and ``tau2`` for mixed effects).

    Raises
    ------
    DesignError
        For an unknown model, a design whose subjects are not the store's, a design
        with missing values, an invalid ``min_subjects``, or mixed effects without
        variances.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(1.0, 1.0, size=(12, 5)).astype("float32")
    >>> y[:3, 0] = np.nan  # three subjects lack voxel 0
    >>> subjects = [f"sub-{i:02d}" for i in range(12)]
    >>> ds = xr.Dataset({"effect": (("subject", "voxel"), y)}, coords={"subject": subjects})
    >>> res = fit(ds, pd.DataFrame({"intercept": 1.0}, index=subjects))
    >>> res.n.values.tolist(), res.dof.values.tolist()
    ([9, 12, 12, 12, 12], [8.0, 11.0, 11.0, 11.0, 11.0])
    """
    from bigglm.glm.orchestration import compute_blocks
    from bigglm.group.collection import open_group
    from bigglm.group.result import GroupResult

    if model not in _MODELS:
        raise DesignError(f"model={model!r}; expected one of {_MODELS}")
    ds = store if isinstance(store, xr.Dataset) else open_group(store)
    subjects = [str(s) for s in ds["subject"].values]
    matrix, frame = aligned_design(design, subjects)
    groups = _variance_groups(variance_groups, design, subjects, model)
    rank = matrix_rank(matrix)
    threshold = _min_subjects(min_subjects, rank, len(subjects))
    plan = _Plan(matrix, threshold, model, groups, knapp_hartung)
    tasks, blocks = _tasks(ds, plan)
    logger.info(
        "fitting %s at %d voxels of %d subjects in %d blocks",
        model,
        ds.sizes["voxel"],
        len(subjects),
        len(tasks),
    )
    values = compute_blocks(tasks, client, progress)
    fitted = _assemble(values, blocks, ds, frame, plan)
    return GroupResult(fitted)


@dataclass(frozen=True)
class _Plan:
    """What every voxel block's task needs besides its data."""

    design: np.ndarray
    min_subjects: int
    model: GroupModel
    groups: np.ndarray | None
    knapp_hartung: bool


def aligned_design(
    design: pd.DataFrame, subjects: Sequence[str]
) -> tuple[np.ndarray, pd.DataFrame]:
    """The design's rows in the store's subject order: as float64, and as a DataFrame."""
    if not isinstance(design, pd.DataFrame):
        raise DesignError(
            f"design must be a pandas DataFrame indexed by subject, got {type(design).__name__}; "
            "build one with bigglm.group.design(participants, ...)"
        )
    from bigglm.group.designs import reorder

    frame = reorder(design.set_axis([str(s) for s in design.index], axis=0), subjects, "the design")
    try:
        matrix = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DesignError(f"the design has non-numeric columns ({err}); encode them first") from err
    bad = ~np.isfinite(matrix)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DesignError(
            f"design row {subjects[row]!r} has no value for {frame.columns[col]!r}; fill it "
            "in or drop the subject"
        )
    return matrix, frame.set_axis([str(c) for c in frame.columns], axis=1)


def _variance_groups(
    groups: str | pd.Series | None, design: pd.DataFrame, subjects: Sequence[str], model: str
) -> np.ndarray | None:
    """Integer codes of each subject's variance group, in store order."""
    if groups is None:
        return None
    if model != "mixed":
        raise DesignError("variance_groups applies to model='mixed' only")
    series = design[groups] if isinstance(groups, str) else groups
    series = series.set_axis([str(s) for s in series.index])
    absent = [s for s in subjects if s not in series.index]
    if absent:
        raise DesignError(f"variance_groups has no group for {', '.join(absent[:5])}")
    codes, _ = pd.factorize(series.loc[list(subjects)], sort=True)
    if (codes < 0).any():
        raise DesignError("variance_groups has missing values; give every subject a group")
    return np.asarray(codes, dtype=np.int64)


def _min_subjects(value: int | float | None, rank: int, n_subjects: int) -> int:
    """The smallest number of subjects a voxel is fitted with."""
    if value is None:
        return rank + 2
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise DesignError(
            f"min_subjects={value!r}; give a number of subjects (int >= 1) or a fraction "
            "of them (a float in (0, 1])"
        )
    if isinstance(value, float):
        if value > 1:
            raise DesignError(f"min_subjects={value} is a float above 1; a fraction is in (0, 1]")
        return max(1, int(np.ceil(value * n_subjects)))
    return int(value)


# --- the graph -------------------------------------------------------------------


def _tasks(ds: xr.Dataset, plan: _Plan) -> tuple[list[Delayed], list[slice]]:
    """One task per voxel block (its value: that block's fitted arrays) and the blocks."""

    effect = subject_by_voxel(ds["effect"])
    p = plan.design.shape[1]
    n_subjects, n_voxels = effect.shape
    if plan.model == "ols":
        width = max(256, OLS_BLOCK_BYTES // (8 * (p * p + 2 * p + 4)))
        make: Callable[..., Delayed] = _ols_task
        arrays = [effect]
    else:
        if "variance" not in ds:
            raise DesignError(
                "model='mixed' needs the first-level variances: collect the store with "
                "variances=[...] (effect_variance, varcope or stat-variance maps)"
            )
        width = max(64, MIXED_BLOCK_BYTES // (8 * 7 * n_subjects))
        make = _mixed_task
        arrays = [effect, subject_by_voxel(ds["variance"])]
    chunk = effect.chunks[1][0]
    if width >= chunk:  # whole chunks per block
        width = chunk * (width // chunk)
    else:  # chunks cut in equal parts, so that blocks tile them
        width = -(-chunk // -(-chunk // width))
    blocks = [slice(lo, min(lo + width, n_voxels)) for lo in range(0, n_voxels, width)]
    return [make([a[:, b] for a in arrays], plan) for b in blocks], blocks


def subject_by_voxel(values: xr.DataArray) -> Any:
    """A DataArray's data as a dask array chunked in subjects (numpy data are chunked here)."""
    import dask.array as da

    from bigglm.group.collection import DEFAULT_CHUNKS

    data = values.transpose("subject", "voxel").data
    if isinstance(data, da.Array):
        return data
    return da.from_array(np.asarray(data), chunks=DEFAULT_CHUNKS)


def _ols_task(arrays: list[Any], plan: _Plan) -> Delayed:
    """Per-chunk statistics, summed over subject blocks by a tree, then the finish."""
    import dask

    (effect,) = arrays
    # one partial per (subject chunk, voxel chunk); chunks of one voxel chunk are summed
    offsets = np.cumsum((0, *effect.chunks[0]))
    columns = []
    for j in range(len(effect.chunks[1])):
        pieces = [
            dask.delayed(_ols_partial)(block, plan.design[offsets[i] : offsets[i + 1]])
            for i, block in enumerate(effect.to_delayed()[:, j])
        ]
        columns.append(_tree(pieces, _add_partials))
    return dask.delayed(_ols_finish)(columns, plan)


def _tree(parts: list[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Pairwise tree reduction of delayed values."""
    import dask

    while len(parts) > 1:
        pairs = [parts[i : i + 2] for i in range(0, len(parts), 2)]
        parts = [dask.delayed(combine)(*p) if len(p) == 2 else p[0] for p in pairs]
    return parts[0]


def _ols_partial(effect: np.ndarray, design: np.ndarray) -> dict[str, np.ndarray]:
    """Sufficient statistics of one chunk: ``X'MX`` (P*P, v), ``X'y``, ``y'y``, ``n``.

    Voxels that every subject of the chunk covers (most, inside the brain) share
    ``X'X`` of the chunk's rows; the matrix product with the presence matrix runs only
    over the voxels some subject lacks.
    """
    present = np.isfinite(effect)
    complete = present.all(axis=0)
    values = effect.astype(np.float64)
    lacking = np.flatnonzero(~complete)
    if lacking.size:
        values[~present] = 0.0
    outer = outer_rows(design)
    gram = np.empty((outer.shape[1], effect.shape[1]))
    gram[:] = outer.sum(axis=0)[:, None]
    if lacking.size:
        gram[:, lacking] = outer.T @ present[:, lacking].astype(np.float64)
    return {
        "gram": gram,
        "xty": design.T @ values,
        "yty": np.einsum("sv,sv->v", values, values),
        "n": present.sum(axis=0, dtype=np.int64),
    }


def _add_partials(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: a[key] + b[key] for key in a}


def _ols_finish(columns: list[dict[str, np.ndarray]], plan: _Plan) -> dict[str, np.ndarray]:
    """Per voxel: betas, residual variance, dof, rank, from the summed statistics."""
    stats = {key: np.concatenate([c[key] for c in columns], axis=-1) for key in columns[0]}
    p = plan.design.shape[1]
    gram = stats["gram"].reshape(p, p, -1)
    inverse, rank = pinv_and_rank(gram)
    beta = np.einsum("ijv,jv->iv", inverse, stats["xty"])
    rss = np.maximum(stats["yty"] - np.einsum("iv,iv->v", beta, stats["xty"]), 0.0)
    n = stats["n"]
    dof = (n - rank).astype(np.float64)
    fitted = (n >= plan.min_subjects) & (dof >= 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2 = np.where(fitted, rss / dof, np.nan)
    return _masked(
        {"beta": beta, "gram": gram, "sigma2": sigma2, "dof": dof, "n": n, "rank": rank}, fitted
    )


def _mixed_task(arrays: list[Any], plan: _Plan) -> Delayed:
    """The whole voxel block (all subjects) to one task: REML needs them together."""
    import dask

    effect, variance = arrays
    effect, variance = (a.rechunk({1: a.shape[1]}) for a in (effect, variance))
    return dask.delayed(_mixed_block)(
        effect.to_delayed()[:, 0].tolist(), variance.to_delayed()[:, 0].tolist(), plan
    )


def _mixed_block(
    effect: list[np.ndarray], variance: list[np.ndarray], plan: _Plan
) -> dict[str, np.ndarray]:
    from bigglm.group.mixed import fit_mixed

    y, s = np.concatenate(effect), np.concatenate(variance)
    out = fit_mixed(y, s, plan.design, groups=plan.groups, knapp_hartung=plan.knapp_hartung)
    fitted = (out["n"] >= plan.min_subjects) & (out["dof"] >= 1)
    out["sigma2"] = out.pop("scale")
    return _masked(out, fitted)


def _masked(out: dict[str, np.ndarray], fitted: np.ndarray) -> dict[str, np.ndarray]:
    """NaN for the floating-point statistics of voxels not fitted (counts and ranks kept)."""
    for key in ("beta", "sigma2", "tau2", "gram"):
        if key in out:
            out[key] = np.where(fitted, out[key], np.nan)
    out["fitted"] = fitted
    return out


def _assemble(
    values: list[dict[str, np.ndarray]],
    blocks: list[slice],
    ds: xr.Dataset,
    design: pd.DataFrame,
    plan: _Plan,
) -> xr.Dataset:
    """The result Dataset from the blocks' arrays."""

    def joined(key: str) -> np.ndarray:
        return np.concatenate([v[key] for v in values], axis=-1)

    columns = [str(c) for c in design.columns]
    data: dict[str, Any] = {
        "beta": (("column", "voxel"), joined("beta")),
        "gram": (("column", "column2", "voxel"), joined("gram")),
        "sigma2": ("voxel", joined("sigma2")),
        "dof": ("voxel", joined("dof")),
        "n": ("voxel", joined("n").astype(np.int32)),
        "rank": ("voxel", joined("rank").astype(np.int32)),
        "design": (("subject", "column"), design.to_numpy(dtype=np.float64)),
    }
    if "tau2" in values[0]:
        data["tau2"] = (("variance_group", "voxel"), joined("tau2"))
        data["converged"] = ("voxel", joined("converged"))
    if "mask" in ds:
        data["mask"] = ds["mask"]
    fitted = joined("fitted")
    coords = {
        "column": columns,
        "column2": columns,
        "subject": design.index.astype(str).to_numpy(dtype=object),
        **{k: ds[k] for k in ("voxel", "i", "j", "k") if k in ds.coords},
    }
    attrs = {
        key: ds.attrs[key] for key in ("affine", "volume_shape", "store", "tr") if key in ds.attrs
    }
    attrs.update(
        model=plan.model,
        min_subjects=plan.min_subjects,
        knapp_hartung=bool(plan.knapp_hartung),
        n_subjects=int(plan.design.shape[0]),
        n_not_fitted=int((~fitted).sum()),
    )
    if attrs["n_not_fitted"]:
        logger.warning(
            "%d of %d voxels have fewer than %d subjects (or no residual dof): NaN",
            attrs["n_not_fitted"],
            fitted.size,
            plan.min_subjects,
        )
    return xr.Dataset(data, coords=coords, attrs=attrs)
