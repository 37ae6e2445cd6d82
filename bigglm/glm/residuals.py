"""Residuals of a fitted GLM, on request: a second, blockwise pass over a run's data.

The fit never forms residuals (its one pass keeps sufficient statistics only). When they
are asked for, they are a lazy dask array with the chunks of the run's ``bold``: one task
per chunk reads it and computes, in float64,

- raw residuals ``e = Y - X beta`` (the betas of the fit, GLS betas for AR models);
- or whitened residuals ``W e = W Y - (W X) beta``, with the exact whitening filter of
  :mod:`bigglm.glm.ar` (Prais–Winsten generalised to order p). ``W`` is banded: a chunk
  needs the p scans before it, which a small task reads from a clone of the chunk(s)
  above it. Each data chunk then has one dependent task, so no chunk waits in memory
  for the next row of chunks, and no task holds more than one chunk (and p rows),
  whatever the run's size; the price is that whitening decompresses chunks twice.

Both are returned as float32, like the store. Voxels whose fit status is not ``ok``
(constant, non-stationary, non-finite) have NaN residuals. The betas (and AR
coefficients) enter the graph per voxel block; on a ``distributed`` client they are
scattered to the workers once rather than shipped with every computation.

Writers stream: a 4D NIfTI is assembled one row of chunks at a time, computed in
groups of chunks (:func:`bigglm.to_nifti`); a Zarr store is written chunk by chunk by
the workers (:func:`write_store`), in the layout of a converted run, so
:func:`bigglm.open_run` opens it.

What this costs in time and memory is measured in README.md ("Fitting and contrasts").
"""

from __future__ import annotations

import datetime
import logging
import os
from itertools import pairwise
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import get_scheduler, tokenize
from dask.graph_manipulation import clone
from numpy.typing import NDArray

from bigglm.exceptions import StoreError
from bigglm.glm import ar
from bigglm.glm.graphs import with_inputs
from bigglm.glm.linalg import serial_matmul
from bigglm.io.artefacts import check_replaceable, writing
from bigglm.io.store import StoreWriter, open_run
from bigglm.typing import ResidualFormat

__all__ = [
    "distributed_client",
    "file_name",
    "open_source",
    "per_voxel_block",
    "residual_array",
    "run_residuals",
    "write_store",
]

logger = logging.getLogger(__name__)

Array = NDArray[np.float64]

#: Float64 working memory per slab of voxels of a residual task.
_SLAB_BYTES = 4 * 2**20


def residual_array(
    bold: da.Array,
    design: Array,
    beta: Array | da.Array,
    phi: Array | da.Array | None = None,
) -> da.Array:
    """Lazy float32 residuals ``(time, voxel)``, chunked as ``bold``.

    Parameters
    ----------
    bold : dask.array.Array, shape (T, V)
        The run's data.
    design : numpy.ndarray, shape (T, P)
    beta : numpy.ndarray or dask.array.Array, shape (P, V)
        NaN columns give NaN residuals.
    phi : numpy.ndarray or dask.array.Array, shape (p, V), optional
        AR coefficients: whiten the residuals with them (see :func:`bigglm.glm.ar.whiten`).

    Returns
    -------
    dask.array.Array
        One task per chunk of ``bold``, the chunk its only input besides the chunk's
        betas (and AR coefficients). Whitening needs the p scans above a chunk: they are
        read by a task of their own from a clone of the chunk(s) above (the chunk is
        decompressed twice), so no chunk waits in memory for the next row of chunks.

    Examples
    --------
    >>> x = np.column_stack([np.arange(6.0), np.ones(6)])
    >>> y = da.from_array((x @ [[2.0], [1.0]] + [[0], [1], [0], [0], [-1], [0]]), chunks=(4, 1))
    >>> residual_array(y, x, np.array([[2.0], [1.0]])).compute().ravel()
    array([ 0.,  1.,  0.,  0., -1.,  0.], dtype=float32)
    >>> residual_array(y, x, np.array([[2.0], [1.0]]), np.array([[0.6]])).compute().ravel()
    array([ 0. ,  1. , -0.6,  0. , -1. ,  0.6], dtype=float32)
    """
    widths = bold.chunks[1]
    beta_blocks = per_voxel_block(beta, widths)
    phi_blocks = None if phi is None else per_voxel_block(phi, widths)
    order = 0 if phi_blocks is None else phi_blocks.shape[0]
    token = tokenize(bold.name, design, beta_blocks.name, getattr(phi_blocks, "name", None))
    name = f"residuals-{token}"
    above = clone(bold) if order else bold  # context reads: keys of their own
    rows = np.cumsum((0, *bold.chunks[0])).tolist()
    layer: dict[Any, Any] = {}
    for i, (start, stop) in enumerate(pairwise(rows)):
        context = min(order, start)
        layer[(f"design-{token}", i)] = np.ascontiguousarray(design[start - context : stop])
        pieces = _context_pieces(rows, i, context)
        for j in range(len(widths)):
            before = None
            if pieces:
                before = (f"context-{token}", i, j)
                layer[before] = (
                    _stack,
                    [(above.name, block, j) for block, _ in pieces],
                    [part for _, part in pieces],
                )
            layer[(name, i, j)] = (
                _residual_block,
                (bold.name, i, j),
                before,
                (f"design-{token}", i),
                (beta_blocks.name, 0, j),
                None if phi_blocks is None else (phi_blocks.name, 0, j),
                start,
            )
    inputs = [bold, beta_blocks] + ([above, phi_blocks] if phi_blocks is not None else [])
    return da.Array(with_inputs(layer, *inputs), name, bold.chunks, dtype=np.float32)


def per_voxel_block(values: Array | da.Array, widths: tuple[int, ...]) -> da.Array:
    """``(k, V)`` values as a dask array with one chunk per voxel block of the data.

    Examples
    --------
    >>> per_voxel_block(np.zeros((2, 5)), (3, 2)).chunks
    ((2,), (3, 2))
    """
    chunks = ((values.shape[0],), tuple(widths))
    if isinstance(values, da.Array):
        return values.rechunk(chunks)
    return da.from_array(np.asarray(values, dtype=np.float64), chunks=chunks)


def _context_pieces(rows: list[int], block: int, context: int) -> list[tuple[int, slice]]:
    """The ``(time block, row slice)`` pieces holding the ``context`` scans before ``block``.

    Examples
    --------
    >>> _context_pieces([0, 1, 2, 5, 9], 3, 2)  # scans 3 and 4, in block 2 (scans 2..4)
    [(2, slice(1, 3, None))]
    >>> _context_pieces([0, 1, 2, 5, 9], 2, 2)  # two blocks of one scan each
    [(0, slice(0, 1, None)), (1, slice(0, 1, None))]
    """
    first = rows[block] - context
    pieces = []
    for index in range(block):
        lo, hi = max(rows[index], first), rows[index + 1]
        if hi > lo:
            pieces.append((index, slice(lo - rows[index], hi - rows[index])))
    return pieces


def _stack(blocks: list[np.ndarray], parts: list[slice]) -> np.ndarray:
    """The rows ``parts`` of consecutive ``blocks``, stacked (a chunk's context rows)."""
    return np.concatenate([b[p] for b, p in zip(blocks, parts, strict=True)])


def _residual_block(
    y: np.ndarray,
    before: np.ndarray | None,
    design: Array,
    beta: Array,
    phi: Array | None,
    start: int,
) -> NDArray[np.float32]:
    """One chunk's residuals, raw or whitened, from its data and the rows above it.

    Computed in float64 over slabs of voxels, so the task holds little more than its
    chunk and its output.
    """
    out = np.empty(y.shape, dtype=np.float32)
    n_rows = design.shape[0]
    step = max(1, _SLAB_BYTES // (8 * n_rows))
    for lo in range(0, y.shape[1], step):
        slab = slice(lo, lo + step)
        rows = y[:, slab] if before is None else np.concatenate([before[:, slab], y[:, slab]])
        resid = rows.astype(np.float64)
        resid -= serial_matmul(design, beta[:, slab])
        if phi is not None:
            resid = ar.whiten(resid, phi[:, slab], start)
        out[:, slab] = resid
    return out


def run_residuals(source: xr.Dataset, fitted: xr.Dataset, *, whitened: bool) -> xr.DataArray:
    """The lazy residuals of one run, from its data and its computed fit.

    Parameters
    ----------
    source : xarray.Dataset
        The run's data (``bold(time, voxel)``), as fitted.
    fitted : xarray.Dataset
        The run's computed result (``beta``, ``design``, ``ar`` for AR models).
    whitened : bool
        Whiten with the fitted AR coefficients (the same as raw for OLS).

    Returns
    -------
    xarray.DataArray
        ``(time, voxel)`` float32, dask-backed, with the run's coordinates.

    Raises
    ------
    StoreError
        If the data do not have the shape the run was fitted with, or the store was
        converted again from other files since the fit.

    Examples
    --------
    >>> x = np.column_stack([np.arange(4.0), np.ones(4)])
    >>> src = xr.Dataset({"bold": (("time", "voxel"), x @ [[1.0], [2.0]] + [[1], [0], [0], [-1]])})
    >>> fit = xr.Dataset({"beta": (("regressor", "voxel"), [[1.0], [2.0]]),
    ...                   "design": (("time", "regressor"), x)}, attrs={"noise": "ols"})
    >>> run_residuals(src, fit, whitened=False).values.ravel()
    array([ 1.,  0.,  0., -1.], dtype=float32)
    """
    _check_source(source, fitted)
    bold = source["bold"]
    data = bold.data if bold.chunks is not None else da.from_array(bold.values)
    beta = fitted["beta"].values
    if "status" in fitted:  # NaN already, by the fit's contract; made explicit here
        beta = np.where(fitted["status"].values == 0, beta, np.nan)
    per_voxel = [beta] + ([fitted["ar"].values] if whitened and "ar" in fitted else [])
    client = distributed_client()
    if client is not None:  # sent to the workers once, not with every graph computed
        per_block = [_scattered(client, values, data.chunks[1]) for values in per_voxel]
    else:
        per_block = [per_voxel_block(values, data.chunks[1]) for values in per_voxel]
    # a model fitted to transformed data (noise="spm-ar1") keeps the design of the data
    design = fitted["model_design" if "model_design" in fitted else "design"].values
    if whitened and ("model_design" in fitted or fitted.attrs.get("noise") == "film"):
        raise ValueError(
            f"whitened residuals of noise={fitted.attrs.get('noise')!r} are not provided; "
            "use whitened=False for Y - X beta"
        )
    array = residual_array(data, design, *per_block)
    phi = per_block[1] if len(per_block) > 1 else None
    coords = {k: v for k, v in bold.coords.items() if set(v.dims) <= {"time", "voxel"}}
    kind = "whitened residuals W(Y - X beta)" if phi is not None else "residuals Y - X beta"
    attrs = {
        "long_name": kind,
        "whitened": bool(whitened),
        "noise": str(fitted.attrs.get("noise", "ols")),
        "units": "as the data",
    }
    return xr.DataArray(array, dims=("time", "voxel"), coords=coords, attrs=attrs)


def _scattered(client: Any, values: Array, widths: tuple[int, ...]) -> da.Array:
    """``(k, V)`` values scattered to a client's workers, one piece per voxel block."""
    edges = np.cumsum((0, *widths)).tolist()
    pieces = [np.ascontiguousarray(values[:, lo:hi]) for lo, hi in pairwise(edges)]
    futures = client.scatter(pieces)
    blocks = [
        da.from_delayed(f, shape=p.shape, dtype=p.dtype)
        for f, p in zip(futures, pieces, strict=True)
    ]
    return da.concatenate(blocks, axis=1)


def distributed_client() -> Any:
    """The ``distributed`` client Dask computes on by default, or None (local schedulers).

    Examples
    --------
    >>> import dask
    >>> with dask.config.set(scheduler="threads"):
    ...     distributed_client() is None
    True
    """
    owner = getattr(get_scheduler(), "__self__", None)
    return owner if owner is not None and hasattr(owner, "persist") else None


def _check_source(source: xr.Dataset, fitted: xr.Dataset) -> None:
    """The data must be those of the fit: same shape, same source files if recorded."""
    where = source.attrs.get("store", "the run's data")
    if "bold" not in source or source["bold"].dims != ("time", "voxel"):
        raise StoreError(f"{where} has no 'bold' variable with dims ('time', 'voxel')")
    expected = (fitted.sizes["time"], fitted.sizes["voxel"])
    if tuple(source["bold"].shape) != expected:
        raise StoreError(
            f"{where} has bold of shape {tuple(source['bold'].shape)} but the fit was made on "
            f"{expected} (time, voxel); compute residuals from the data that were fitted"
        )
    fitted_sums = [s.get("sha256") for s in fitted.attrs.get("sources", [])]
    source_sums = [s.get("sha256") for s in source.attrs.get("sources", [])]
    if fitted_sums and source_sums and fitted_sums != source_sums:
        raise StoreError(
            f"{where} was converted from other files since the fit (SHA-256 differ); "
            "fit again before asking for residuals"
        )


def file_name(prefix: str, *, whitened: bool, format: ResidualFormat) -> str:
    """The BIDS-derivatives name of a run's residuals.

    Examples
    --------
    >>> file_name("sub-01_task-faces_run-1", whitened=False, format="nifti")
    'sub-01_task-faces_run-1_desc-residuals_bold.nii.gz'
    >>> file_name("sub-01", whitened=True, format="zarr")
    'sub-01_desc-whitenedResiduals_bold.zarr'
    """
    desc = "whitenedResiduals" if whitened else "residuals"
    return f"{prefix}_desc-{desc}_bold{'.zarr' if format == 'zarr' else '.nii.gz'}"


def open_source(given: Any) -> xr.Dataset:
    """A run's data as given to :func:`bigglm.fit`: a store path or a Dataset."""
    return given if isinstance(given, xr.Dataset) else open_run(given)


def write_store(
    residuals: xr.DataArray,
    like: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write residuals as a bigglm store (the layout of a converted run), atomically.

    Each task writes whole Zarr chunks (the chunks of the residuals, made regular if
    needed), so workers write in parallel and nothing is gathered; the store is built in
    a hidden sibling folder and renamed into place when complete.

    Parameters
    ----------
    residuals : xarray.DataArray
        ``(time, voxel)``, from :func:`run_residuals`.
    like : xarray.Dataset
        The run's store (from :func:`bigglm.open_run`): mask, grid and TR.
    path : path-like
    overwrite : bool
        Replace an existing residuals store bigglm wrote (anything else is refused).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    StoreError
        If ``path`` exists and ``overwrite`` is False, or ``like`` has no voxel grid.

    Examples
    --------
    >>> import tempfile, nibabel, bigglm
    >>> tmp = Path(tempfile.mkdtemp())
    >>> y = np.random.default_rng(0).normal(size=(2, 1, 1, 5)).astype("float32")
    >>> nibabel.save(nibabel.Nifti1Image(y, np.eye(4)), tmp / "bold.nii")
    >>> run = bigglm.open_run(bigglm.convert(tmp / "bold.nii", tmp / "b.zarr", tr=2.0,
    ...                                      mask=np.ones((2, 1, 1), bool)))
    >>> out = write_store(run.bold - run.bold.mean("time"), run, tmp / "resid.zarr")
    >>> bigglm.open_run(out).bold.shape
    (5, 2)
    """
    if "mask" not in like or "affine" not in like.attrs or "tr" not in like.attrs:
        raise StoreError("the run has no voxel grid (mask, affine, TR); fit from a store")
    target = Path(path).expanduser().resolve()
    check_replaceable(target, "residuals-store", overwrite=overwrite)
    data = residuals.data if residuals.chunks is not None else da.from_array(residuals.values)
    chunks = (data.chunks[0][0], data.chunks[1][0])
    data = data.rechunk(chunks).astype(np.float32)
    with writing(target, "residuals-store", overwrite=overwrite, directory=True) as stage:
        writer = StoreWriter(
            stage,
            np.asarray(like["mask"].values, dtype=bool),
            n_volumes=data.shape[0],
            tr=float(like.attrs["tr"]),
            chunks=chunks,
        )
        da.store(data, writer.bold, lock=False)  # type: ignore[arg-type, unused-ignore]
        writer.finish(_store_attributes(residuals, like))
    return target


def _store_attributes(residuals: xr.DataArray, like: xr.Dataset) -> dict[str, Any]:
    """The run's geometry, and what the residuals are and where they come from."""
    from bigglm import __version__

    keep = ("affine", "volume_shape", "tr", "units")
    attrs = {k: like.attrs[k] for k in keep if k in like.attrs}
    attrs.update(
        residuals={
            "whitened": bool(residuals.attrs.get("whitened", False)),
            "noise": residuals.attrs.get("noise"),
            "description": residuals.attrs.get("long_name", "residuals"),
            "source_store": like.attrs.get("store"),
        },
        version=__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    return attrs
