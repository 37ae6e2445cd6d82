"""The fit as a Dask graph: statistics per chunk, tree reduction over time, finish per block.

For every voxel block of a run the graph holds one task per chunk (its sufficient
statistics), a tree of ``combine`` tasks over consecutive time blocks, and one ``finish``
task. The design terms enter the graph once, as one delayed object every task depends
on; chunk tasks depend on the array's own chunk keys, so each chunk is read exactly once
whatever the noise model (the offset task reads the first chunk's first row from the
same key).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from operator import getitem
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize
from dask.delayed import Delayed

from bigglm.exceptions import DesignError
from bigglm.glm.finish import STATUS_FLAGS, finish_block
from bigglm.glm.graphs import with_inputs
from bigglm.glm.noise import check_fit_size, noise_order
from bigglm.glm.result import GLMResult
from bigglm.glm.stats import DesignTerms, chunk_statistics, combine
from bigglm.io.geometry import COLUMN_COORDS, GEOMETRY_ATTRS
from bigglm.typing import GlobalScaling, NoiseModel

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["fit"]

logger = logging.getLogger(__name__)


def fit(
    runs: str | PathLike[str] | xr.Dataset | Sequence[str | PathLike[str] | xr.Dataset],
    designs: pd.DataFrame | np.ndarray | Sequence[pd.DataFrame | np.ndarray],
    *,
    noise: NoiseModel | str = "ols",
    scaling: GlobalScaling = "none",
    client: Client | None = None,
    split_every: int = 4,
    film_autocorrelation: Any = None,
    film_smoothing: tuple[float, float] | None = None,
) -> GLMResult:
    """Fit the GLM to every voxel of one or several runs, in one pass over the data.

    Parameters
    ----------
    runs : path, xarray.Dataset, or a list of them
        Stores (opened with :func:`bigglm.open_run`) or Datasets with a ``bold``
        (time, voxel) variable; a list means several runs of one subject.
    designs : pandas.DataFrame or list of them
        One design matrix (scans x regressors, named columns) per run. A bare array
        gets columns ``x0, x1, ...``.
    noise : {"ols", "ar1", "ar2", ..., "spm-ar1", "film"}
        Ordinary least squares, or GLS with per-voxel AR(p) noise estimated by
        Yule–Walker from the OLS residuals (see :mod:`bigglm.glm.ar` for the exact
        whitening convention and how it compares with nilearn and statsmodels), or
        SPM12's AR(0.2) model: one covariance for all voxels, estimated by ReML from the
        voxels the effects of interest drive (:mod:`bigglm.glm.pooled`; the high-pass
        set is the columns named ``drift_*``). That estimate is a first pass over the
        data, computed when ``fit`` is called; the whitened fit stays lazy. Or
        ``"film"``: FSL FILM's prewhitening, each voxel whitened in the frequency domain
        by its own Tukey-tapered autocorrelation (:mod:`bigglm.glm.film`, which says what
        is reproduced exactly); it reads whole series in voxel blocks (a rechunk of the
        store, memory bounded per block).
    scaling : {"none", "session", "scan"}
        SPM's global scaling of the data before the fit: ``"session"`` multiplies each
        run by ``100 / mean(global)`` (SPM's grand mean scaling, which it always
        applies), ``"scan"`` each scan by ``100 / global`` (SPM's 'Scaling' global
        normalisation). A scan's global is SPM's: the mean of the voxels above an eighth
        of the scan's mean over the whole volume, recorded per scan by
        :func:`bigglm.convert` (``spm_global`` in the store). Session scaling changes
        betas and variances, not t or z of one run; the factors are kept in the result's
        attributes (``global_scaling``).
    client : distributed.Client, optional
        Where to compute. Without one, Dask's default is used: an active
        ``distributed`` client if there is one, otherwise the threaded scheduler
        in this process (the work is BLAS and decompression, which release the GIL,
        so threads scale without copying chunks between processes).
    split_every : int
        Fan-in of the tree reduction over time blocks.
    film_autocorrelation : array, path, or a list of them (one per run), optional
        With ``noise="film"``: use these autocorrelations instead of estimating them,
        a ``(lag, voxel)`` array or a 4D NIfTI such as FILM's ``stats/threshac1``.
    film_smoothing : (float, float), optional
        With ``noise="film"`` and an estimated autocorrelation: smooth the raw estimates
        in space before the taper, as FILM's ``--sa`` does, with a SUSAN-like filter of
        ``(sigma_mm, brightness_threshold)`` on the data's mean image
        (:func:`bigglm.glm.film.susan_smooth`; approximate). This adds a first pass
        over the data (voxel blocks with whole series).

    Returns
    -------
    GLMResult
        Lazy: nothing is read until the result is computed, written, or asked for a
        contrast.

    Raises
    ------
    DesignError
        If a design does not match its run, the same run is given twice, or the noise
        model is not understood.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = pd.DataFrame({"task": np.tile([0.0, 1.0], 10), "constant": 1.0})
    >>> y = 100 + 2 * x["task"].to_numpy()[:, None] + rng.normal(size=(20, 3))
    >>> ds = xr.Dataset({"bold": (("time", "voxel"), y.astype("float32"))})
    >>> result = fit(ds, x, noise="ar1").compute()
    >>> result.beta.sel(regressor="task").round(1).values
    array([1.9, 1.3, 2.6])
    """
    try:
        order = noise_order(noise)
    except DesignError as err:
        raise DesignError(f"noise={noise!r} is not understood: {err}") from None
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    run_list = _as_list(runs, (str, PathLike, xr.Dataset))
    design_list = _as_list(designs, (pd.DataFrame, np.ndarray))
    if len(run_list) != len(design_list):
        raise DesignError(
            f"got {len(run_list)} runs but {len(design_list)} designs; give one design per run"
        )
    datasets = [_open(run) for run in run_list]
    _check_distinct(run_list, datasets)
    scaled = [_globally_scaled(ds, scaling, index) for index, ds in enumerate(datasets)]
    datasets = [ds for ds, _ in scaled]
    notes = [note for _, note in scaled]
    _check_same_voxels(datasets)
    frames = [_as_frame(d) for d in design_list]
    for option, value in (
        ("film_autocorrelation", film_autocorrelation),
        ("film_smoothing", film_smoothing),
    ):
        if value is not None and noise != "film":
            raise DesignError(f"{option} is an option of noise='film', not {noise!r}")
    if noise == "spm-ar1":
        built = _spm_ar1_graphs(datasets, frames, split_every, client, notes)
    elif noise == "film":
        given = film_autocorrelation
        per_run = given if isinstance(given, list | tuple) else [given] * len(datasets)
        if len(per_run) != len(datasets):
            raise DesignError(
                f"film_autocorrelation has {len(per_run)} entries for {len(datasets)} runs; "
                "give one per run"
            )
        built = [
            _film_graph(ds, frame, index, ac, note, film_smoothing)
            for index, (ds, frame, ac, note) in enumerate(
                zip(datasets, frames, per_run, notes, strict=True)
            )
        ]
    else:
        built = [
            _run_graph(ds, frame, order, noise, split_every, index, notes=note)
            for index, (ds, frame, note) in enumerate(zip(datasets, frames, notes, strict=True))
        ]
    return GLMResult([b[0] for b in built], [b[1] for b in built], client=client, like=run_list)


def _spm_ar1_graphs(
    datasets: list[xr.Dataset],
    frames: list[pd.DataFrame],
    split_every: int,
    client: Client | None,
    notes: list[dict[str, Any]],
) -> list[tuple[xr.Dataset, list[tuple[slice, Delayed]]]]:
    """SPM's AR(0.2) model: the pooled covariance pass now, the whitened fits lazily."""
    from bigglm.glm.pooled import spm_ar1_runs

    for index, (ds, frame) in enumerate(zip(datasets, frames, strict=True)):
        _check(ds, frame, 0, index)
    whitened = spm_ar1_runs(datasets, frames, client=client)
    built = [
        _run_graph(
            run.dataset,
            run.design,
            0,
            "spm-ar1",
            split_every,
            index,
            residual_dof=run.residual_dof,
            dof=run.dof,
            notes={**note, "spm_ar1": run.summary, "whitening": "SPM AR(0.2), pooled ReML"},
        )
        for index, (run, note) in enumerate(zip(whitened, notes, strict=True))
    ]
    for (dataset, _), frame in zip(built, frames, strict=True):
        dataset["model_design"] = (("time", "regressor"), frame.to_numpy(dtype=np.float64))
    return built


def _film_graph(
    ds: xr.Dataset,
    frame: pd.DataFrame,
    index: int,
    given: Any,
    note: dict[str, Any],
    smoothing: tuple[float, float] | None = None,
) -> tuple[xr.Dataset, list[tuple[slice, Delayed]]]:
    """FILM's fit of one run: one task per voxel block holding whole time series."""
    import dask

    from bigglm.glm import film
    from bigglm.glm.pooled import whole_series

    _check(ds, frame, 0, index)
    X = frame.to_numpy(dtype=np.float64)
    n, n_reg = X.shape
    bold = da.asarray(ds["bold"].data)
    n_vox = bold.shape[1]
    coords = {c: ds.coords[c].values for c in ("i", "j", "k") if c in ds.coords}
    ac = None if given is None else film.given_autocorrelation(given, coords, n_vox)
    n_lag = int(np.sqrt(n)) if ac is None else ac.shape[0]
    # whole series in blocks of the store's own voxel chunks (about 64 MiB each);
    # film_block whitens them a slab of voxels at a time
    bold = whole_series(bold, n)
    design = dask.delayed(X, pure=True)
    if ac is None and smoothing is not None:
        ac = _film_smoothed(ds, bold, design, n_lag, smoothing, coords)
    finishes: list[tuple[slice, Delayed]] = []
    lo = 0
    for j, width in enumerate(bold.chunks[1]):
        part = None if ac is None else ac[:, lo : lo + width]
        task = dask.delayed(film.film_block, pure=True)(bold.blocks[0, j], design, part)
        finishes.append((slice(lo, lo + width), task))
        lo += width
    shapes = {
        "beta": ((n_reg,), np.float64),
        "sigma2": ((), np.float64),
        "status": ((), np.int8),
        "film_covariance": ((n_reg, n_reg), np.float64),
        "film_autocorrelation": ((n_lag,), np.float64),
    }
    lazy = {
        name: da.concatenate(
            [
                da.from_delayed(dask.delayed(getitem)(t, name), (*rows, sl.stop - sl.start), dtype)
                for sl, t in finishes
            ],
            axis=-1,
        )
        for name, (rows, dtype) in shapes.items()
    }
    terms = DesignTerms.build(X, 0)
    coord_names = {c: ds.coords[c] for c in ("time", *COLUMN_COORDS) if c in ds.coords}
    out = xr.Dataset(
        {
            "beta": (("regressor", "voxel"), lazy["beta"]),
            "sigma2": (("voxel",), lazy["sigma2"]),
            "status": (("voxel",), lazy["status"], _status_attrs()),
            "design": (("time", "regressor"), X),
            "dof": ((), film.film_dof(X)),
            "film_covariance": (("regressor", "regressor_2", "voxel"), lazy["film_covariance"]),
            "film_autocorrelation": (("film_lag", "voxel"), lazy["film_autocorrelation"]),
        },
        coords={
            "regressor": np.array(list(frame.columns), dtype=object),
            "regressor_2": np.array(list(frame.columns), dtype=object),
            **coord_names,
        },
    )
    out.attrs = _provenance(ds, "film", terms)
    out.attrs.update(
        note,
        whitening="FSL FILM: per-voxel Tukey-tapered autocorrelation, FFT filter",
        film_autocorrelation=(
            "given"
            if given is not None
            else f"estimated, Tukey M={n_lag}, "
            + (f"SUSAN-like smoothing {list(smoothing)}" if smoothing else "not smoothed")
        ),
    )
    return out, finishes


def _film_smoothed(
    ds: xr.Dataset,
    bold: da.Array,
    design: Delayed,
    n_lag: int,
    smoothing: tuple[float, float],
    coords: dict[str, Any],
) -> np.ndarray:
    """FILM's ``--sa`` estimate (approximately): raw autocorrelations of every voxel (a
    first pass over the data, computed now), smoothed in space, then tapered."""
    import dask

    from bigglm.glm import film

    sigma, brightness = (float(v) for v in smoothing)
    if not (sigma > 0 and brightness > 0) or "affine" not in ds.attrs or len(coords) < 3:
        raise DesignError(
            f"film_smoothing={smoothing!r} needs a positive (sigma_mm, brightness_threshold) "
            "and a volume run with an affine and voxel coordinates i, j, k"
        )
    parts = dask.compute(
        *[
            dask.delayed(film.film_raw_block)(bold.blocks[0, j], design, n_lag)
            for j in range(bold.numblocks[1])
        ]
    )
    raw = np.concatenate([p["raw"] for p in parts], axis=1)
    mean = np.concatenate([p["mean"] for p in parts])
    ijk = np.column_stack([np.asarray(coords[c], dtype=np.int64) for c in ("i", "j", "k")])
    voxel_size = np.linalg.norm(np.asarray(ds.attrs["affine"], dtype=np.float64)[:3, :3], axis=0)
    smoothed = film.susan_smooth(raw, ijk, voxel_size, mean, sigma, brightness)
    return np.asarray(smoothed * film.tukey_taper(n_lag)[:, None], dtype=np.float64)


def _globally_scaled(ds: xr.Dataset, scaling: str, index: int) -> tuple[xr.Dataset, dict[str, Any]]:
    """The run scaled as SPM does (lazily), and the note recording the factors."""
    if scaling == "none":
        return ds, {}
    if scaling not in ("session", "scan"):
        raise DesignError(f"scaling={scaling!r} is not known; use 'none', 'session' or 'scan'")
    recorded = ds.attrs.get("spm_global")
    values = np.asarray([np.nan if g is None else g for g in recorded or []], dtype=np.float64)
    if values.shape != (ds.sizes["time"],) or not (np.isfinite(values).all() and values.min() > 0):
        raise DesignError(
            f"run {index} has no usable per-scan globals for scaling={scaling!r} (found "
            f"{values.size} for {ds.sizes['time']} scans); stores converted by this bigglm "
            "record them (attribute 'spm_global'): convert the run again, or use "
            "scaling='none'"
        )
    factors = 100.0 / (values if scaling == "scan" else np.full_like(values, values.mean()))
    bold = ds["bold"] * xr.DataArray(factors, dims="time")
    out = ds.assign(bold=bold.astype(np.float64).assign_attrs(ds["bold"].attrs))
    recorded_factor: float | list[float] = (
        factors.tolist() if scaling == "scan" else float(factors[0])
    )
    return out, {"global_scaling": {"mode": scaling, "factor": recorded_factor}}


def _as_list(value: Any, single: tuple[type, ...]) -> list[Any]:
    """Wrap a single run or design in a list."""
    return [value] if isinstance(value, single) else list(value)


def _open(run: str | PathLike[str] | xr.Dataset) -> xr.Dataset:
    """A Dataset with a dask-backed ``bold`` (time, voxel)."""
    if not isinstance(run, xr.Dataset):
        from bigglm.io import open_run

        run = open_run(run)
    if "bold" not in run or run["bold"].dims != ("time", "voxel"):
        raise DesignError("each run needs a 'bold' variable with dims ('time', 'voxel')")
    if run["bold"].chunks is None:
        run = run.assign(bold=run["bold"].chunk())
    return run


def _identities(run: Any, ds: xr.Dataset) -> list[tuple[str, str]]:
    """What makes a run the same as another: its Dataset object, its store's path, the
    files it was converted from (a copy of a store, or a second conversion of one file,
    holds the same scans)."""
    found = [("Dataset", f"object at {id(run):#x}")] if isinstance(run, xr.Dataset) else []
    stores = [] if isinstance(run, xr.Dataset) else [run]
    if ds.attrs.get("store"):
        stores.append(ds.attrs["store"])
    found += [("store", str(Path(store).expanduser().resolve())) for store in stores]
    sources = ds.attrs.get("sources") or []
    digests = [s.get("sha256") if isinstance(s, dict) else None for s in sources]
    if digests and all(isinstance(d, str) for d in digests):
        found.append(("data", f"converted from files of SHA-256 {', '.join(map(str, digests))}"))
    return found


def _check_distinct(runs: list[Any], datasets: list[xr.Dataset]) -> None:
    """A run given twice would count its scans twice (doubled dof, inflated z)."""
    seen: dict[tuple[str, str], int] = {}
    for index, (run, ds) in enumerate(zip(runs, datasets, strict=True)):
        for identity in dict.fromkeys(_identities(run, ds)):
            if identity in seen:
                raise DesignError(
                    f"runs {seen[identity]} and {index} are the same {identity[0]} "
                    f"({identity[1]}); give each run once (a run fitted twice doubles "
                    "its degrees of freedom and inflates every z)"
                )
            seen[identity] = index


def _check_same_voxels(datasets: list[xr.Dataset]) -> None:
    """Several runs must share their voxels (one mask) to be combined voxel by voxel."""
    first = datasets[0]
    for index, ds in enumerate(datasets[1:], start=1):
        same = ds.sizes["voxel"] == first.sizes["voxel"] and all(
            np.array_equal(ds[c].values, first[c].values)
            for c in COLUMN_COORDS
            if c in ds.coords and c in first.coords
        )
        if not same:
            raise DesignError(
                f"run {index} has other voxels than run 0 ({ds.sizes['voxel']} vs "
                f"{first.sizes['voxel']}); convert the runs with the same mask"
            )


def _as_frame(design: pd.DataFrame | np.ndarray) -> pd.DataFrame:
    """A float64 DataFrame with string column names."""
    if isinstance(design, pd.DataFrame):
        frame = design.astype(np.float64)
    else:
        array = np.asarray(design, dtype=np.float64)
        frame = pd.DataFrame(array, columns=[f"x{i}" for i in range(array.shape[1])])
    frame.columns = [str(c) for c in frame.columns]
    if not np.all(np.isfinite(frame.to_numpy())):
        bad = [c for c in frame.columns if not np.all(np.isfinite(frame[c]))]
        raise DesignError(f"design columns {bad} contain NaN or inf; fill or drop them")
    return frame


def _check(ds: xr.Dataset, frame: pd.DataFrame, order: int, index: int) -> None:
    """Raise DesignError when the design cannot be fitted to the run."""
    n_scans = ds.sizes["time"]
    if frame.shape[0] != n_scans:
        raise DesignError(
            f"design {index} has {frame.shape[0]} rows but run {index} has {n_scans} "
            "volumes; build the design from the run's frame times"
        )
    check_fit_size(n_scans, frame.shape[1], order, f"run {index}")


def _time_chunks(bold: xr.DataArray, order: int) -> xr.DataArray:
    """Merge time chunks shorter than the AR order into their neighbour."""
    chunks = list(bold.chunks[0]) if bold.chunks else [bold.sizes["time"]]
    if order == 0 or min(chunks) >= order:
        return bold
    merged: list[int] = []
    for size in chunks:
        if merged and (size < order or merged[-1] < order):
            merged[-1] += size
        else:
            merged.append(size)
    return bold.chunk({"time": tuple(merged)})


#: Largest size of one voxel block's sufficient statistics (a ``Partial``). A reduction
#: task holds ``split_every + 1`` of them, so this bounds task memory whatever the design.
STATS_BUDGET = 16 * 2**20


def _voxel_chunks(bold: xr.DataArray, n_regressors: int, order: int) -> xr.DataArray:
    """Split voxel chunks whose statistics would exceed :data:`STATS_BUDGET`.

    The statistics of a voxel block are at most ``(p + 1) * P + 3p + 1`` float64 rows
    per voxel (the finish expands the derived lagged products to all of them):
    a long run with a cosine drift can have hundreds of regressors, and a 32,768-voxel
    block then needs tens of MB per partial sum. Each store chunk is split into equal
    pieces (dask reads it once and slices it), so the data are still read once.

    Examples
    --------
    >>> bold = xr.DataArray(np.zeros((4, 100)), dims=("time", "voxel")).chunk({"voxel": 100})
    >>> _voxel_chunks(bold, 2, 0).chunks[1]
    (100,)
    >>> _voxel_chunks(bold, 100_000, 0).chunks[1]  # 20 voxels of 100,001 rows fit 16 MiB
    (20, 20, 20, 20, 20)
    >>> _voxel_chunks(bold, 30_000, 0).chunks[1]
    (50, 50)
    """
    rows = (order + 1) * n_regressors + 3 * order + 1
    widest = max(1, STATS_BUDGET // (8 * rows))
    chunks = bold.chunks[1] if bold.chunks else (bold.sizes["voxel"],)
    if max(chunks) <= widest:
        return bold
    split: list[int] = []
    for width in chunks:
        pieces = -(-width // widest)
        step = -(-width // pieces)
        split += [step] * (width // step) + ([width % step] if width % step else [])
    return bold.chunk({"voxel": tuple(split)})


def _run_graph(
    ds: xr.Dataset,
    frame: pd.DataFrame,
    order: int,
    noise: str,
    split_every: int,
    index: int,
    *,
    residual_dof: float | None = None,
    dof: float | None = None,
    notes: dict[str, Any] | None = None,
) -> tuple[xr.Dataset, list[tuple[slice, Delayed]]]:
    """The lazy result Dataset of one run, and its per-voxel-block finish tasks.

    The graph is written out task by task (:mod:`bigglm.glm.graphs`). A noise model that
    whitens before the fit gives its own divisor of the residual sum of squares
    (``residual_dof``), degrees of freedom (``dof``) and provenance (``notes``)."""
    _check(ds, frame, order, index)
    terms = replace(DesignTerms.build(frame.to_numpy(), order), residual_dof=residual_dof)
    bold = _voxel_chunks(_time_chunks(ds["bold"], order), frame.shape[1], order)
    array: da.Array = bold.data
    token = tokenize(array.name, frame.to_numpy(), order, split_every, residual_dof)
    terms_key = f"DesignTerms-{token}"
    layer: dict[Any, Any] = {terms_key: terms}
    starts = np.concatenate([[0], np.cumsum(array.chunks[0])[:-1]]).astype(int)
    spans = terms.constant_fit is not None
    if not spans:
        logger.info("design %d does not span the constant: sums are taken on raw values", index)
    finish_keys = []
    for j in range(len(array.chunks[1])):
        offset = (f"offset-{token}", j)
        layer[offset] = (_offset, (array.name, 0, j), spans)
        leaves = []
        for i, start in enumerate(starts):
            leaves.append((f"chunk_statistics-{token}", i, j))
            layer[leaves[-1]] = (
                chunk_statistics,
                (array.name, i, j),
                offset,
                terms_key,
                int(start),
            )
        total = _tree(layer, leaves, split_every, f"combine-{token}", j)
        finish_keys.append((f"finish_block-{token}", j))
        layer[finish_keys[-1]] = (finish_block, total, offset, terms_key)
    graph = with_inputs(layer, array)
    finishes = []
    lo = 0
    for key, width in zip(finish_keys, array.chunks[1], strict=True):
        finishes.append((slice(lo, lo + width), Delayed(key, graph)))
        lo += width
    dataset = _lazy_dataset(ds, frame, terms, graph, token, finish_keys, array.chunks[1], noise)
    if dof is not None:
        dataset["dof"] = ((), float(dof))
    dataset.attrs.update(notes or {})
    return dataset, finishes


def _offset(first_block: np.ndarray, spans_constant: bool) -> np.ndarray:
    """The per-voxel offset: the first scan's values, or zero if X lacks the constant."""
    first = np.asarray(first_block[0], dtype=np.float64)
    return first if spans_constant else np.zeros_like(first)


def _tree(layer: dict[Any, Any], keys: list[Any], split_every: int, name: str, j: int) -> Any:
    """Combine consecutive partial statistics (fan-in ``split_every``), in order; the
    tasks go into ``layer`` and the key of the root is returned."""
    level = 0
    while len(keys) > 1:
        groups = [keys[i : i + split_every] for i in range(0, len(keys), split_every)]
        keys = [(name, level, g, j) for g in range(len(groups))]
        for key, group in zip(keys, groups, strict=True):
            layer[key] = (combine, list(group))
        level += 1
    return keys[0]


def _lazy_dataset(
    ds: xr.Dataset,
    frame: pd.DataFrame,
    terms: DesignTerms,
    graph: dict[Any, Any],
    token: str,
    finish_keys: list[Any],
    widths: tuple[int, ...],
    noise: str,
) -> xr.Dataset:
    """Views of the finish tasks' outputs as one lazy Dataset."""
    n_reg, order = frame.shape[1], terms.order

    def stacked(name: str, rows: tuple[int, ...], dtype: Any) -> da.Array:
        array_name = f"{name}-{token}"
        lead = (0,) * len(rows)
        views = {(array_name, *lead, j): (getitem, key, name) for j, key in enumerate(finish_keys)}
        chunks = (*((r,) for r in rows), widths)
        return da.Array({**graph, **views}, array_name, chunks, dtype=dtype)

    variables: dict[str, Any] = {
        "beta": (("regressor", "voxel"), stacked("beta", (n_reg,), np.float64)),
        "sigma2": (("voxel",), stacked("sigma2", (), np.float64)),
        "status": (("voxel",), stacked("status", (), np.int8), _status_attrs()),
        "design": (("time", "regressor"), frame.to_numpy()),
        "dof": ((), float(frame.shape[0] - terms.rank)),
    }
    if order:
        variables["ar"] = (("lag", "voxel"), stacked("ar", (order,), np.float64))
    coords: dict[str, Any] = {"regressor": np.array(list(frame.columns), dtype=object)}
    if order:
        coords["lag"] = np.arange(1, order + 1)
    for name in ("time", *COLUMN_COORDS):
        if name in ds.coords:
            coords[name] = ds.coords[name]
    out = xr.Dataset(variables, coords=coords)
    out.attrs = _provenance(ds, noise, terms)
    return out


def _status_attrs() -> dict[str, Any]:
    """CF flag attributes for the ``status`` variable."""
    return {
        "flag_values": list(STATUS_FLAGS.values()),
        "flag_meanings": " ".join(STATUS_FLAGS),
        "long_name": "fit status; voxels that are not ok have NaN statistics",
    }


def _provenance(ds: xr.Dataset, noise: str, terms: DesignTerms) -> dict[str, Any]:
    """JSON-serialisable attributes: the run's geometry and how the fit was made."""
    from bigglm import __version__

    keep = (*GEOMETRY_ATTRS, "affine", "volume_shape", "tr", "store", "sources", "units")
    attrs = {k: ds.attrs[k] for k in keep if k in ds.attrs}
    attrs.update(
        noise=noise,
        rank=terms.rank,
        n_scans=int(terms.matrix.shape[0]),
        bigglm_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        whitening="exact AR(p) (Prais-Winsten generalised)" if terms.order else "none",
    )
    return attrs
