"""Permutation inference on a group store: every rearrangement as a few matrix products.

The model is partitioned per contrast as in FSL randomise and PALM: the nuisance space
is ``Z = {X b : c'b = 0}`` and Freedman–Lane rearranges the residuals of the reduced
model, ``E = R_Z Y``. With ``a = X (X'X)^+ c`` (orthogonal to ``Z``) and ``N`` an
orthonormal basis of ``Z``, a rearrangement ``Y* = S P E`` (permutation ``P``, signs
``S``) gives, per voxel, without refitting::

    c'b*  = (P'S a)'E
    RSS*  = ||E||^2 - (c'b*)^2 / a'a - sum_k ((P'S n_k)'E)^2
    t*    = c'b* / sqrt(RSS* / (n - rank) * a'a)

so a batch of B rearrangements is one product of a ``(B (1 + J)) x n`` matrix with a
voxel block ``n x v`` (``J = rank - 1`` nuisance columns; one-sample: ``J = 0``). The
identity gives the ordinary t. One-sample designs (a constant column alone) allow
missing subjects per voxel: a missing value is 0 in the product and each voxel has its
own ``n``; other designs test the voxels that every subject covers (the others are NaN,
counted in the attrs).

Voxel-wise inference (uncorrected and max-T FWE p) reads each voxel block once: one
task per block runs all rearrangements in batches and returns its per-rearrangement
maxima and its exceedance counts. Spatial statistics (TFCE, cluster extent and mass)
need whole maps: the prepared blocks are kept in memory, tiles of (rearrangements x
voxel block) are assembled into rounds of whole maps sized to :data:`ROUND_BYTES`, and
each round returns its maxima.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import xarray as xr

from bigglm.exceptions import DesignError
from bigglm.glm import contrasts as con
from bigglm.inference.resampling import Rearrangements, rearrangements
from bigglm.typing import GroupModel, PermutationScheme, Precision, ProgressCallback

if TYPE_CHECKING:
    from distributed import Client

    from bigglm.group.result import GroupResult
    from bigglm.inference.spatial import Graph

__all__ = ["BATCH_BYTES", "ROUND_BYTES", "permutation_test"]

logger = logging.getLogger(__name__)

#: Bytes of one batch's products (float64 statistics of B rearrangements x a block).
BATCH_BYTES = 64 * 2**20

#: Bytes of one round of whole maps (rearrangements x voxels) for TFCE and clusters.
ROUND_BYTES = 256 * 2**20

#: Fewest rounds of whole maps a TFCE/cluster test is split into (parallelism).
MIN_ROUNDS = 8

#: Largest data (subjects x voxels in the product's float type) held in memory across
#: the rounds of TFCE and cluster inference; larger data are read once per round.
HOLD_BYTES = 4 * 2**30

#: Relative tolerance within which a rearranged statistic ties the observed one.
TIE_TOLERANCE = {"double": 1e-6, "single": 1e-5}

#: TFCE parameters for volumes (FSL randomise, nilearn).
TFCE_E, TFCE_H, TFCE_STEPS = 0.5, 2.0, 100


@dataclass(frozen=True, eq=False)
class _Model:
    """The contrast's projections of a design (float64, in store subject order)."""

    a: np.ndarray  # (n,) c'b = a'y
    nuisance: np.ndarray  # (n, J) orthonormal basis of the reduced model
    rank: int
    one_sample: bool  # a constant column alone: missing subjects allowed
    min_subjects: int
    dtype: type[np.floating[Any]]
    mixed: bool = False  # weighted by 1 / (first-level variance + tau2 under H0)


@dataclass(frozen=True, eq=False)
class _Block:
    """A voxel block ready for rearranging: the valid voxels' residuals and constants."""

    valid: np.ndarray  # (v,) bool
    residuals: np.ndarray  # (n, v_valid) in the product dtype; missing values are 0
    rss: np.ndarray  # (v_valid,) ||E||^2
    aa: np.ndarray  # (v_valid,) a'a
    scale: np.ndarray  # (v_valid,) factor of the product giving c'b
    dof: np.ndarray  # (v_valid,)
    known: np.ndarray | None = None  # (v_valid,) variance of c'b when it is known (mixed)


def permutation_test(
    source: str | os.PathLike[str] | xr.Dataset | GroupResult,
    design: pd.DataFrame | None = None,
    contrast: con.ContrastSpec | None = None,
    *,
    n_perm: int = 10000,
    scheme: PermutationScheme = "auto",
    blocks: str | Sequence[Any] | pd.Series | None = None,
    whole_blocks: bool = False,
    tfce: bool = False,
    cluster_threshold: float | None = None,
    connectivity: int = 6,
    adjacency: Graph | None = None,
    two_sided: bool = False,
    seed: int | None = None,
    precision: Precision = "double",
    min_subjects: int | None = None,
    model: GroupModel | None = None,
    client: Client | None = None,
    progress: ProgressCallback | None = None,
) -> xr.Dataset:
    """Permutation inference for one t contrast of a group model, at every voxel.

    Parameters
    ----------
    source : path, xarray.Dataset or GroupResult
        A group store (:func:`bigglm.group.collect`), its Dataset, or a fitted
        :class:`~bigglm.group.GroupResult` (its store and design are used).
    design : pandas.DataFrame, optional
        One row per subject, indexed by subject (:func:`bigglm.group.design`); taken
        from ``source`` when it is a GroupResult.
    contrast : contrast
        One t contrast over the design's columns (``"patients - controls"``, weights).
        Default: the design's only column.
    n_perm : int
        Rearrangements, the identity included. When there are at most this many
        distinct ones, all are used (an exact test; ``attrs["exact"]``).
    scheme : {"auto", "signflip", "permute", "both"}
        What is rearranged: sign flips of the residuals (errors symmetric; default for a
        design of one column), permutations (errors exchangeable; default otherwise),
        or both.
    blocks : design column name, sequence or Series of labels, optional
        Exchangeability blocks (repeated measures, families).
    whole_blocks : bool
        Rearrange whole blocks (of equal size) instead of subjects within blocks.
    tfce : bool
        Threshold-free cluster enhancement (E=0.5, H=2, 100 steps, the
        fslmaths/nilearn convention; E=1 with an ``adjacency``) and its FWE p values.
    cluster_threshold : float, optional
        Cluster-forming threshold on the t statistic (as randomise ``-c``; from a p
        value: ``scipy.stats.t.isf(p, dof)``): cluster extent and mass FWE p values.
    connectivity : {6, 18, 26}
        Voxel neighbourhood for clusters and TFCE.
    adjacency : bigglm.inference.spatial.Graph, optional
        The neighbourhoods of the columns instead of the voxel grid: for maps on
        cortical surfaces, the mesh graph of the columns
        (:func:`bigglm.inference.meshes.mesh_adjacency`), or any graph
        (:func:`bigglm.inference.spatial.sparse_graph`). ``connectivity`` is then
        unused, and TFCE takes the 2-D defaults of FSL (``--T2``) and PALM
        (``-tfce2D``), H=2 and E=1 (:data:`bigglm.inference.spatial.SURFACE_TFCE`).
    two_sided : bool
        Test ``|t|`` (both tails; clusters of either sign).
    seed : int, optional
        Seeds the rearrangements; the same seed gives the same p values whatever the
        chunking and the workers.
    precision : {"double", "single"}
        Float type of the products (statistics are assembled in float64). "single"
        halves the products' time and the data's memory at cohort scale; its rounding
        (1e-7) depends on the BLAS's blocking, so a rearrangement within the tie
        tolerance of the observed statistic (1e-5) may count or not with another
        chunking: p values can then differ by one rearrangement at a rare voxel.
    min_subjects : int, optional
        One-sample designs: voxels with fewer subjects are not tested (default 3).
    model : {"ols", "mixed"}, optional
        The statistic: the OLS t (default), or, for one-sample designs of a store with
        first-level variances, the mixed-effects score ``sum w_i y_i / sqrt(sum w_i)``
        with ``w_i = 1 / (s_i + tau2)`` and ``tau2`` estimated under H0 from ``y_i^2``,
        which no sign flip changes: the test is exact with subject-specific variances
        (sign flips need only independent, symmetrically distributed errors). Default:
        the GroupResult's model, else "ols".
    client : distributed.Client, optional
    progress : callable, optional
        Called with ``(done, total)`` tasks.

    Returns
    -------
    xarray.Dataset
        Per voxel: ``t``, ``p`` (uncorrected), ``p_fwe`` (max-T); with ``tfce``:
        ``tfce``, ``p_tfce_fwe``; with ``cluster_threshold``: ``cluster_extent``,
        ``cluster_mass`` (of each voxel's cluster), ``p_cluster_extent_fwe``,
        ``p_cluster_mass_fwe``. The null distributions of the maxima over the
        ``rearrangement`` dimension (``max_t``, ``max_tfce``, ``max_cluster_extent``,
        ``max_cluster_mass``); the grid (``mask``, ``i``, ``j``, ``k``); attrs with the
        scheme, counts, seed and whether the test was exact.

    Raises
    ------
    DesignError
        For a contrast that is not one estimable t contrast, an unknown scheme, a
        scheme that cannot change the statistic, bad blocks, or no testable voxel.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> subjects = [f"sub-{i:02d}" for i in range(10)]
    >>> y = rng.normal(0.0, 1.0, (10, 50))
    >>> y[:, :5] += 2.0
    >>> ds = xr.Dataset({"effect": (("subject", "voxel"), y)}, coords={"subject": subjects})
    >>> out = permutation_test(ds, pd.DataFrame({"mean": 1.0}, index=subjects), seed=0)
    >>> out.attrs["exact"], out.sizes["rearrangement"]
    (True, 1024)
    >>> float(out["p"][0]), float(out["p_fwe"][0])  # 1 / 1024: only the identity ties
    (0.0009765625, 0.0009765625)
    >>> bool((out["p_fwe"][5:] > 0.05).all())
    True
    """
    if model is None:
        model = getattr(source, "dataset", xr.Dataset()).attrs.get("model", "ols")
    ds, frame = _source(source, design)
    subjects = [str(s) for s in ds["subject"].values]
    from bigglm.group.engine import aligned_design

    matrix, frame = aligned_design(frame, subjects)
    weights = _t_weights(contrast, matrix, list(frame.columns))
    prepared = _model(matrix, weights, precision, min_subjects, model, ds)
    chosen = _scheme(scheme, matrix, prepared)
    labels = _block_labels(blocks, frame, subjects)
    plan = rearrangements(
        len(subjects), scheme=chosen, n_perm=n_perm, blocks=labels, whole=whole_blocks, seed=seed
    )
    logger.info(
        "%s: %d rearrangements (%s) of %d subjects at %d voxels",
        chosen,
        plan.count,
        "all of them: exact" if plan.exact else f"drawn from seed {plan.seed}",
        len(subjects),
        ds.sizes["voxel"],
    )
    spatial = _Spatial.of(ds, tfce, cluster_threshold, connectivity, adjacency)
    if spatial is None:
        blocks_ = _voxel_blocks(ds, prepared)
        values = _voxelwise(blocks_, prepared, plan, two_sided, precision, client, progress)
    else:
        values = _spatialwise(ds, prepared, plan, two_sided, precision, spatial, client, progress)
    out = _dataset(values, ds, plan, chosen, weights, frame, two_sided, precision, spatial)
    out.attrs["statistic"] = "mixed-effects score z" if prepared.mixed else "t"
    if not np.isfinite(out["t"].values).any():
        raise DesignError("no voxel could be tested (too few subjects present everywhere?)")
    return out


# --- inputs ----------------------------------------------------------------------


def _source(
    source: str | os.PathLike[str] | xr.Dataset | GroupResult, design: pd.DataFrame | None
) -> tuple[xr.Dataset, pd.DataFrame]:
    from bigglm.group.collection import open_group
    from bigglm.group.result import GroupResult

    if isinstance(source, GroupResult):
        fitted = source.dataset
        if "store" not in fitted.attrs:
            raise DesignError(
                "this GroupResult was fitted from an in-memory Dataset: pass that Dataset "
                "(or the group store) and the design instead"
            )
        if design is None:
            design = pd.DataFrame(
                fitted["design"].values, index=fitted["subject"].values, columns=source.columns
            )
        source = fitted.attrs["store"]
    if design is None:
        raise DesignError("give the design (bigglm.group.design(...)) or a fitted GroupResult")
    ds = source if isinstance(source, xr.Dataset) else open_group(source)
    if "effect" not in ds:
        raise DesignError("the group data have no 'effect(subject, voxel)' variable")
    return ds, design


def _t_weights(spec: con.ContrastSpec | None, matrix: np.ndarray, columns: list[str]) -> np.ndarray:
    if spec is None:
        if len(columns) != 1:
            raise DesignError(
                f"the design has {len(columns)} columns ({', '.join(columns)}); say which "
                "contrast to test, e.g. contrast='patients - controls'"
            )
        spec = columns[0]
    if con.default_kind(spec) != "t":
        raise DesignError(
            "permutation tests take one t contrast (one row of weights); test the rows of "
            "an F contrast one by one"
        )
    return con.estimable_contrast(spec, matrix, columns, kind="t")[0]


def _model(
    matrix: np.ndarray,
    weights: np.ndarray,
    precision: Precision,
    min_subjects: int | None,
    statistic: str = "ols",
    ds: xr.Dataset | None = None,
) -> _Model:
    if statistic not in ("ols", "mixed"):
        raise DesignError(f"model={statistic!r}; expected 'ols' or 'mixed'")
    if precision not in TIE_TOLERANCE:
        raise DesignError(f"precision={precision!r}; expected 'single' or 'double'")
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    keep = s > s[0] * max(matrix.shape) * np.finfo(float).eps
    rank = int(keep.sum())
    a = u[:, keep] @ ((vt[keep] @ weights) / s[keep])  # X (X'X)^+ c
    space = u[:, keep]
    projected = space.T @ a
    nuisance = _complement(space, projected / np.linalg.norm(projected))
    one_sample = matrix.shape[1] == 1 and bool(np.all(matrix == matrix[0]))
    if min_subjects is not None and (isinstance(min_subjects, bool) or min_subjects < 2):
        raise DesignError(f"min_subjects={min_subjects!r}; give a count of at least 2")
    dtype = np.float32 if precision == "single" else np.float64
    mixed = statistic == "mixed"
    if mixed and not one_sample:
        raise DesignError(
            "model='mixed' permutation tests are for one-sample designs (sign flips of "
            "subjects with their own variances); test other designs with model='ols'"
        )
    if mixed and (ds is None or "variance" not in ds):
        raise DesignError(
            "model='mixed' needs the first-level variances: collect the store with variances=[...]"
        )
    return _Model(a, nuisance, rank, one_sample, min_subjects or rank + 2, dtype, mixed)


def _complement(space: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """An orthonormal basis of ``space``'s columns orthogonal to ``direction`` (in it)."""
    k = space.shape[1]
    if k == 1:
        return np.empty((space.shape[0], 0))
    # Householder reflection taking direction to e_1: its other columns span the rest
    v = direction.copy()
    v[0] += np.copysign(1.0, v[0])
    reflector = np.eye(k) - 2.0 * np.outer(v, v) / (v @ v)
    return space @ reflector[:, 1:]


def _scheme(scheme: str, matrix: np.ndarray, model: _Model) -> Any:
    if scheme == "auto":
        return "signflip" if model.rank == 1 and matrix.shape[1] == 1 else "permute"
    if scheme not in ("signflip", "permute", "both"):
        raise DesignError(f"scheme={scheme!r}; expected 'auto', 'signflip', 'permute' or 'both'")
    if model.mixed and scheme != "signflip":
        raise DesignError(
            f"scheme={scheme!r} with model='mixed': subjects with their own variances are "
            "not exchangeable, only their signs are; use scheme='signflip'"
        )
    if scheme == "permute" and bool(np.all(matrix == matrix[0])):
        raise DesignError(
            "every subject has the same design row, so permuting them cannot change the "
            "statistic; use scheme='signflip' (one-sample test)"
        )
    return scheme


def _block_labels(
    blocks: str | Sequence[Any] | pd.Series | None, frame: pd.DataFrame, subjects: list[str]
) -> np.ndarray | None:
    if blocks is None:
        return None
    if isinstance(blocks, str):
        if blocks not in frame.columns:
            raise DesignError(f"blocks={blocks!r} is not a design column ({list(frame.columns)})")
        return frame[blocks].to_numpy()
    if isinstance(blocks, pd.Series):
        series = blocks.set_axis([str(s) for s in blocks.index])
        absent = [s for s in subjects if s not in series.index]
        if absent:
            raise DesignError(f"blocks has no label for {', '.join(absent[:5])}")
        return series.loc[subjects].to_numpy()
    return np.asarray(blocks)


# --- voxel blocks ------------------------------------------------------------------


def _voxel_blocks(ds: xr.Dataset, model: _Model) -> list[Any]:
    """One delayed :class:`_Block` per voxel chunk of the effect array."""
    import dask

    from bigglm.group.engine import subject_by_voxel

    effect = subject_by_voxel(ds["effect"])
    effect = effect.rechunk({0: effect.shape[0]})
    if not model.mixed:
        return [dask.delayed(_prepare)(block, model) for block in effect.to_delayed()[0]]
    variance = subject_by_voxel(ds["variance"]).rechunk(effect.chunks)
    pairs = zip(effect.to_delayed()[0], variance.to_delayed()[0], strict=True)
    return [dask.delayed(_prepare_mixed)(y, s, model) for y, s in pairs]


def _prepare_mixed(y: np.ndarray, s: np.ndarray, model: _Model) -> _Block:
    """Inverse-variance weighted data of a block, ``tau2`` estimated under H0.

    ``tau2`` is the maximum-likelihood between-subject variance of ``y_i ~ N(0, tau2 +
    s_i)``: a function of ``y_i^2`` and ``s_i`` only, so every sign flip leaves it, and
    the weights, unchanged, and the weighted score ``sum w_i y_i / sqrt(sum w_i)`` (a z
    statistic under H0) is exactly sign-flip exchangeable.
    """
    y, s = np.asarray(y, dtype=np.float64), np.asarray(s, dtype=np.float64)
    present = np.isfinite(y) & np.isfinite(s)
    valid = present.sum(axis=0) >= model.min_subjects
    y = np.where(present[:, valid], y[:, valid], 0.0)
    s = np.where(present[:, valid], s[:, valid], np.inf)  # weight 0 where missing
    w = 1.0 / (s + _null_tau2(y, s, present[:, valid])[None, :])
    factor = model.a[0] * model.a.size  # c / x: the contrast on the constant column
    ones = np.ones(w.shape[1])
    known = np.sum(w, axis=0) * factor**2
    return _Block(valid, (w * y).astype(model.dtype), ones, ones, factor * ones, ones, known)


def _null_tau2(y: np.ndarray, s: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per voxel, the ML ``tau2 >= 0`` of ``y ~ N(0, tau2 + s)`` (Fisher scoring)."""
    y2 = np.where(present, y**2, 0.0)
    n = present.sum(axis=0)
    tau2 = np.maximum(np.sum(y2 - np.where(present, s, 0.0), axis=0) / np.maximum(n, 1), 0.0)
    for _ in range(100):
        w = 1.0 / (s + tau2)
        score = np.sum(w**2 * y2 - w, axis=0)
        step = score / np.maximum(np.sum(w**2, axis=0), 1e-300)
        new = np.maximum(tau2 + step, 0.0)
        if np.all(np.abs(new - tau2) <= 1e-10 * (1.0 + tau2)):
            return new
        tau2 = new
    return tau2


def _prepare(y: np.ndarray, model: _Model) -> _Block:
    """Residuals of the reduced model and the per-voxel constants of a block.

    The data stay in the product's float type (a block of 10,000 subjects is large);
    only per-voxel sums are float64.
    """
    y = np.asarray(y)
    n_v = np.isfinite(y).sum(axis=0)
    valid = n_v >= model.min_subjects if model.one_sample else n_v == y.shape[0]
    e = (y if valid.all() else y[:, valid]).astype(model.dtype, copy=False)
    if model.one_sample:  # missing values count as 0 in the product
        e = np.nan_to_num(e, copy=not e.flags.writeable or e is y)
        n = n_v[valid].astype(np.float64)
        factor = model.a[0] * model.a.size  # c / x: the contrast on the constant column
        aa, scale, dof = factor**2 / n, factor / n, n - 1.0
    else:
        if model.nuisance.shape[1]:
            basis = model.nuisance.astype(model.dtype)
            e = e - basis @ (basis.T @ e)
        aa = np.full(e.shape[1], model.a @ model.a)
        scale = np.ones(e.shape[1])
        dof = np.full(e.shape[1], float(y.shape[0] - model.rank))
    rss = np.einsum("sv,sv->v", e, e, dtype=np.float64)
    return _Block(valid, e, rss, aa, scale, dof)


def _weights(model: _Model) -> np.ndarray:
    """The vectors rearranged: ``a`` (or ones, one-sample) and the nuisance basis."""
    first = np.ones_like(model.a) if model.one_sample else model.a
    return np.column_stack([first, model.nuisance])


def _rearranged(
    vectors: np.ndarray, order: np.ndarray | None, signs: np.ndarray | None
) -> np.ndarray:
    """``(B, k, n)``: each rearrangement's ``P'S v`` for the columns ``v`` of vectors.

    ``Y*_i = s_i E_order[i]``, so ``v'Y* = sum_i v_i s_i E_order[i]``: the weight of
    subject ``order[i]`` is ``v_i s_i``.
    """
    if order is None and signs is None:
        return vectors.T[None].copy()
    rows = (order if order is not None else signs).shape[0]  # type: ignore[union-attr]
    w = np.broadcast_to(vectors.T[None], (rows, *vectors.T.shape)).copy()
    if signs is not None:
        w *= signs[:, None, :]
    if order is None:
        return w
    moved = np.empty_like(w)
    np.put_along_axis(moved, np.broadcast_to(order[:, None, :], w.shape), w, axis=2)
    return moved


def _statistics(
    block: _Block, model: _Model, order: np.ndarray | None, signs: np.ndarray | None
) -> np.ndarray:
    """t of each rearrangement (rows) at each valid voxel of the block, float64."""
    return _t_values(_products(block, model, order, signs), block)


def _products(
    block: _Block, model: _Model, order: np.ndarray | None, signs: np.ndarray | None
) -> np.ndarray:
    """``(B, k, v)``: the rearranged vectors' inner products with the block's residuals."""
    w = _rearranged(_weights(model), order, signs)
    rows, k, _ = w.shape
    products = w.reshape(rows * k, -1).astype(model.dtype) @ block.residuals
    return products.reshape(rows, k, -1)


def _t_values(products: np.ndarray, block: _Block) -> np.ndarray:
    """t from the products (the formula of the module docstring), float64."""
    products = products.astype(np.float64)
    effect = products[:, 0] * block.scale
    if block.known is not None:
        return effect / np.sqrt(block.known)
    rss = block.rss - effect**2 / block.aa
    if products.shape[1] > 1:
        rss -= np.einsum("bkv,bkv->bv", products[:, 1:], products[:, 1:])
    np.maximum(rss, 0.0, out=rss)
    with np.errstate(divide="ignore", invalid="ignore"):
        return effect / np.sqrt(rss / block.dof * block.aa)


def _batch_rows(model: _Model, n_valid: int) -> int:
    k = 1 + model.nuisance.shape[1]
    return int(max(1, min(4096, BATCH_BYTES // (8 * (k + 3) * max(n_valid, 1)))))


# --- voxel-wise inference ------------------------------------------------------------


def _voxelwise(
    blocks: list[Any],
    model: _Model,
    plan: Rearrangements,
    two_sided: bool,
    precision: Precision,
    client: Client | None,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    import dask

    from bigglm.glm.orchestration import compute_blocks

    tasks = [dask.delayed(_block_pass)(b, model, plan, two_sided, precision) for b in blocks]
    parts = compute_blocks(tasks, client, progress)
    return {
        "t": np.concatenate([p["t"] for p in parts]),
        "count": np.concatenate([p["count"] for p in parts]),
        "max_t": np.max([p["max_t"] for p in parts], axis=0),
    }


def _block_pass(
    block: _Block, model: _Model, plan: Rearrangements, two_sided: bool, precision: Precision
) -> dict[str, np.ndarray]:
    """All rearrangements on one block: observed t, exceedance counts, maxima.

    Each batch's products are reduced in one compiled pass
    (:func:`bigglm.inference.kernels.reduce_batch`): its t values are never stored.
    """
    from bigglm.inference.kernels import reduce_batch

    if model.nuisance.shape[1] == 0:
        return _monotone_pass(block, model, plan, two_sided, precision)
    count = np.zeros(block.residuals.shape[1], dtype=np.int64)
    maxima = np.full(plan.count, -np.inf)
    known = np.empty(0) if block.known is None else block.known
    observed = _t_values(_products(block, model, None, None), block)[0]
    floor = _floor(_tail(observed, two_sided), precision)
    for lo, hi, products in _batches(block, model, plan):
        reduce_batch(
            products, block.scale, block.rss, block.aa, block.dof, known, floor,
            two_sided, count, maxima[lo:hi],
        )  # fmt: skip
    return {
        "t": _scatter(observed, block.valid),
        "count": _scatter(count.astype(np.float64), block.valid),
        "max_t": maxima,
    }


def _monotone_pass(
    block: _Block, model: _Model, plan: Rearrangements, two_sided: bool, precision: Precision
) -> dict[str, np.ndarray]:
    """:func:`_block_pass` without nuisance columns, in ``r = effect / sqrt(rss a'a)``.

    t is ``r sqrt(dof) / sqrt(1 - r^2)``, increasing in ``r`` for each dof (the
    mixed-effects score is ``r`` itself): counts and maxima are taken on ``r``
    (:func:`bigglm.inference.kernels.reduce_monotone`), maxima turned into t per dof.
    """
    from bigglm.inference.kernels import reduce_monotone

    if block.known is not None:
        factor, dofs, group = block.scale / np.sqrt(block.known), np.ones(1), None
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = block.scale / np.sqrt(block.rss * block.aa)
        factor[~np.isfinite(factor)] = np.nan  # no residual variance: not tested
        dofs, group = np.unique(block.dof, return_inverse=True)
    group = np.zeros(factor.size, dtype=np.int64) if group is None else group.ravel()
    count = np.zeros(factor.size, dtype=np.int64)
    top = np.full((plan.count, max(dofs.size, 1)), -np.inf)
    observed = _t_values(_products(block, model, None, None), block)[0]
    floor = _t_to_r(_floor(_tail(observed, two_sided), precision), block, group, dofs)
    for lo, hi, products in _batches(block, model, plan):
        reduce_monotone(products[:, 0], factor, floor, group, two_sided, count, top[lo:hi])
    maxima = _r_to_t(top, dofs, block.known is not None).max(axis=1) if factor.size else top[:, 0]
    return {
        "t": _scatter(observed, block.valid),
        "count": _scatter(count.astype(np.float64), block.valid),
        "max_t": maxima,
    }


def _batches(
    block: _Block, model: _Model, plan: Rearrangements
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Each batch of rearrangements (rows ``lo:hi``) and its products with the block."""
    step = _batch_rows(model, block.residuals.shape[1])
    for lo in range(0, plan.count, step):
        hi = min(lo + step, plan.count)
        yield lo, hi, _products(block, model, *plan.rows(lo, hi))


def _t_to_r(t: np.ndarray, block: _Block, group: np.ndarray, dofs: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_r_to_t`, voxel by voxel (``±inf`` to ``±1``)."""
    if block.known is not None:
        return t
    dof = dofs[group]
    with np.errstate(invalid="ignore"):
        r = t / np.sqrt(dof + t * t)
    return np.where(np.isinf(t), np.sign(t), r)


def _r_to_t(r: np.ndarray, dofs: np.ndarray, known: bool) -> np.ndarray:
    """t of ``r`` for each dof group (columns); the mixed-effects score is ``r``."""
    if known:
        return r
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(dofs) / np.sqrt(np.maximum(1.0 - r * r, 0.0))
    return np.where(np.isneginf(r), -np.inf, t)


def _floor(target: np.ndarray, precision: Precision) -> np.ndarray:
    """Values at least this tie or beat ``target``."""
    return target - TIE_TOLERANCE[precision] * np.abs(target)


def _tail(stat: np.ndarray, two_sided: bool) -> np.ndarray:
    out = np.abs(stat) if two_sided else stat.copy()
    out[np.isnan(out)] = -np.inf  # no dof left at a rearrangement: never exceeds
    return out


def _scatter(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.full(valid.shape, np.nan)
    out[valid] = values
    return out


# --- spatial inference ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Spatial:
    graph: Graph
    tfce: bool
    threshold: float | None
    connectivity: int | str
    E: float = TFCE_E
    H: float = TFCE_H

    @classmethod
    def of(
        cls,
        ds: xr.Dataset,
        tfce: bool,
        threshold: float | None,
        connectivity: int,
        adjacency: Graph | None = None,
    ) -> _Spatial | None:
        if not tfce and threshold is None:
            return None
        if threshold is not None and not (np.isfinite(threshold) and threshold > 0):
            raise DesignError(
                f"cluster_threshold={threshold!r}; give a positive t value (from a p value: "
                "scipy.stats.t.isf(p, dof))"
            )
        cut = None if threshold is None else float(threshold)
        if adjacency is not None:
            return cls._on_graph(ds, adjacency, tfce, cut)
        if connectivity not in (6, 18, 26):
            raise DesignError(f"connectivity={connectivity!r}; expected 6, 18 or 26")
        if not all(axis in ds.coords for axis in "ijk"):
            raise DesignError(
                "TFCE and cluster inference need the voxel grid (i, j, k); test a group "
                "store from bigglm.group.collect"
            )
        from bigglm.inference import spatial

        ijk = np.column_stack([np.asarray(ds[axis].values) for axis in "ijk"])
        graph = spatial.voxel_graph(ijk, connectivity=connectivity)  # type: ignore[arg-type]
        return cls(graph, tfce, cut, connectivity)

    @classmethod
    def _on_graph(
        cls, ds: xr.Dataset, adjacency: Graph, tfce: bool, threshold: float | None
    ) -> _Spatial:
        from bigglm.inference.spatial import SURFACE_TFCE, Graph

        if not isinstance(adjacency, Graph):
            raise DesignError(
                f"adjacency is a {type(adjacency).__name__}; give a bigglm.inference.spatial."
                "Graph (mesh_adjacency for a mesh, sparse_graph for a sparse matrix)"
            )
        if adjacency.n != ds.sizes["voxel"]:
            raise DesignError(
                f"adjacency has {adjacency.n} nodes but the maps have {ds.sizes['voxel']} "
                "columns; build it for the same vertices (mesh_adjacency of the same store)"
            )
        return cls(adjacency, tfce, threshold, "graph", SURFACE_TFCE["E"], SURFACE_TFCE["H"])

    def maxima(self, maps: np.ndarray, two_sided: bool) -> dict[str, np.ndarray]:
        """Per map (rows): the largest TFCE value, cluster extent and mass."""
        from bigglm.inference import spatial

        maps = np.nan_to_num(maps, nan=0.0)
        out: dict[str, np.ndarray] = {}
        if self.tfce:
            scores = spatial.tfce(
                maps, self.graph, E=self.E, H=self.H, n_steps=TFCE_STEPS, two_sided=two_sided
            )
            out["max_tfce"] = np.abs(scores).max(axis=1) if two_sided else scores.max(axis=1)
        if self.threshold is not None:
            extent, mass = spatial.clusters(maps, self.graph, self.threshold, two_sided=two_sided)
            out["max_cluster_extent"], out["max_cluster_mass"] = extent, mass
        return out


def _spatialwise(
    ds: xr.Dataset,
    model: _Model,
    plan: Rearrangements,
    two_sided: bool,
    precision: Precision,
    spatial: _Spatial,
    client: Client | None,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    import dask

    from bigglm.glm.orchestration import compute_blocks

    held = _held_blocks(ds, model, client)
    first = compute_blocks(
        [_tile(b, model, plan, 0, 1) for b in held or _voxel_blocks(ds, model)], client, None
    )
    observed = np.concatenate(first, axis=1)[0].astype(np.float64)
    floor = _floor(_tail(observed, two_sided), precision)
    width = np.dtype(model.dtype).itemsize * max(observed.size, 1)
    # rounds of at most ROUND_BYTES, and at least MIN_ROUNDS of them to share the workers
    step = max(1, min(ROUND_BYTES // width, -(-plan.count // MIN_ROUNDS)))
    rounds = []
    for lo in range(0, plan.count, step):
        blocks = held or _voxel_blocks(ds, model)  # not held: read again for each round
        tiles = [_tile(b, model, plan, lo, min(lo + step, plan.count)) for b in blocks]
        rounds.append(dask.delayed(_round)(tiles, floor, spatial, two_sided))
    parts = compute_blocks(rounds, client, progress)
    values: dict[str, Any] = {"t": observed, "count": sum(p["count"] for p in parts)}
    for key in parts[0]:
        if key.startswith("max_"):
            values[key] = np.concatenate([p[key] for p in parts])
    return values


def _held_blocks(ds: xr.Dataset, model: _Model, client: Client | None) -> list[Any] | None:
    """The prepared blocks, kept in memory for all rounds if they fit :data:`HOLD_BYTES`."""
    import dask

    size = ds.sizes["subject"] * ds.sizes["voxel"] * np.dtype(model.dtype).itemsize
    if size > HOLD_BYTES:
        logger.warning(
            "the data (%.1f GB) are more than bigglm holds in memory for TFCE and clusters "
            "(%.1f GB): they are read once per round of whole maps",
            size / 1e9,
            HOLD_BYTES / 1e9,
        )
        return None
    blocks = _voxel_blocks(ds, model)
    return client.persist(blocks) if client is not None else list(dask.persist(*blocks))


def _tile(block: Any, model: _Model, plan: Rearrangements, lo: int, hi: int) -> Any:
    import dask

    return dask.delayed(_tile_values)(block, model, plan, lo, hi)


def _tile_values(
    block: _Block, model: _Model, plan: Rearrangements, lo: int, hi: int
) -> np.ndarray:
    """t of rearrangements ``lo:hi`` at every voxel of a block (NaN where not tested)."""
    out = np.full((hi - lo, block.valid.size), np.nan, dtype=model.dtype)
    out[:, block.valid] = _statistics(block, model, *plan.rows(lo, hi))
    return out


def _round(
    tiles: list[np.ndarray], floor: np.ndarray, spatial: _Spatial, two_sided: bool
) -> dict[str, np.ndarray]:
    """One round of whole maps: exceedance counts, voxel and spatial maxima."""
    maps = np.concatenate(tiles, axis=1)
    stat = _tail(maps.astype(np.float64), two_sided)
    out = {"count": (stat >= floor).sum(axis=0).astype(np.float64), "max_t": stat.max(axis=1)}
    out.update(spatial.maxima(maps, two_sided))
    return out


# --- the result ------------------------------------------------------------------------


def _p_of(null: np.ndarray, observed: np.ndarray, precision: Precision) -> np.ndarray:
    """Share of the null maxima at least the observed values (ties within tolerance)."""
    ordered = np.sort(null)
    floor = _floor(observed, precision)
    above = null.size - np.searchsorted(ordered, floor, side="left")
    return np.where(np.isfinite(observed), above / null.size, np.nan)


def _dataset(
    values: dict[str, Any],
    ds: xr.Dataset,
    plan: Rearrangements,
    scheme: str,
    weights: np.ndarray,
    frame: pd.DataFrame,
    two_sided: bool,
    precision: Precision,
    spatial: _Spatial | None,
) -> xr.Dataset:
    t = values["t"]
    tested = np.isfinite(t)
    target = np.where(tested, np.abs(t) if two_sided else t, np.nan)
    data: dict[str, Any] = {
        "t": ("voxel", t),
        "p": ("voxel", np.where(tested, values["count"] / plan.count, np.nan)),
        "p_fwe": ("voxel", _p_of(values["max_t"], target, precision)),
        "max_t": ("rearrangement", values["max_t"]),
    }
    if spatial is not None:
        data.update(_spatial_maps(values, t, spatial, two_sided, precision))
    if "mask" in ds:
        data["mask"] = ds["mask"]
    from bigglm.io.geometry import COLUMN_COORDS, GEOMETRY_ATTRS

    coords = {k: ds[k] for k in COLUMN_COORDS if k in ds.coords}
    grid = (*GEOMETRY_ATTRS, "affine", "volume_shape", "store")
    attrs = {key: ds.attrs[key] for key in grid if key in ds.attrs}
    attrs.update(
        scheme=scheme,
        n_rearrangements=plan.count,
        n_possible=str(plan.total),
        exact=bool(plan.exact),
        seed=plan.seed,
        two_sided=bool(two_sided),
        precision=precision,
        contrast=[float(w) for w in weights],
        columns=[str(c) for c in frame.columns],
        n_subjects=plan.n_subjects,
        n_not_tested=int((~tested).sum()),
    )
    if spatial is not None:
        attrs.update(connectivity=spatial.connectivity)
        if spatial.tfce:
            attrs.update(tfce_E=spatial.E, tfce_H=spatial.H, tfce_steps=TFCE_STEPS)
        if spatial.threshold is not None:
            attrs.update(cluster_threshold=spatial.threshold)
    if attrs["n_not_tested"]:
        logger.warning("%d voxels not tested (subjects missing there): NaN", attrs["n_not_tested"])
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _spatial_maps(
    values: dict[str, Any], t: np.ndarray, spatial: _Spatial, two_sided: bool, precision: Precision
) -> dict[str, Any]:
    from bigglm.inference import spatial as sp

    filled = np.nan_to_num(t, nan=0.0)
    out: dict[str, Any] = {}
    if spatial.tfce:
        score = sp.tfce(
            filled, spatial.graph, E=spatial.E, H=spatial.H, n_steps=TFCE_STEPS, two_sided=two_sided
        )
        target = np.abs(score) if two_sided else score
        p = _p_of(values["max_tfce"], target, precision)
        out["tfce"] = ("voxel", np.where(np.isfinite(t), score, np.nan))
        out["p_tfce_fwe"] = ("voxel", np.where(np.isfinite(t), p, np.nan))
        out["max_tfce"] = ("rearrangement", values["max_tfce"])
    if spatial.threshold is not None:
        labels, extents, masses = sp.label(
            filled, spatial.graph, spatial.threshold, two_sided=two_sided
        )
        for name, sizes in (("extent", extents), ("mass", masses)):
            null = values[f"max_cluster_{name}"]
            size = np.asarray(sizes, dtype=np.float64)
            p_cluster = _p_of(null, size, precision)
            per_voxel = np.concatenate([[0.0], size])[labels]  # label 0: no cluster, p 1
            p_voxel = np.concatenate([[1.0], p_cluster])[labels]
            out[f"cluster_{name}"] = ("voxel", np.where(np.isfinite(t), per_voxel, np.nan))
            out[f"p_cluster_{name}_fwe"] = ("voxel", np.where(np.isfinite(t), p_voxel, np.nan))
            out[f"max_cluster_{name}"] = ("rearrangement", null)
    return out
