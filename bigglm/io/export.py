"""Writing per-voxel values back onto a run's original grid as NIfTI."""

from __future__ import annotations

import os
from itertools import pairwise
from pathlib import Path
from typing import IO, Any

import dask.array as da
import nibabel as nib
import numpy as np
import xarray as xr
from isal import igzip

from bigglm.exceptions import StoreError
from bigglm.io.artefacts import marker, writing
from bigglm.io.store import open_run

__all__ = ["to_nifti"]

#: Bytes of output volumes assembled per write (bounds memory for long series).
_WRITE_BLOCK_BYTES = 64 * 1024 * 1024

#: Offset of the voxel data in a single-file NIfTI-1 with no extensions.
_VOX_OFFSET = 352


def to_nifti(
    values: Any,
    like: str | os.PathLike[str] | xr.Dataset,
    path: str | os.PathLike[str],
    *,
    fill: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``(voxel,)`` values as a 3D NIfTI, or ``(n, voxel)`` values as a 4D one.

    Parameters
    ----------
    values : array-like, dask array or xarray.DataArray
        One value per in-mask voxel (a map), or ``n`` rows of them (a series: the 4th
        NIfTI axis). A DataArray's ``voxel`` dimension may come first or last.
        Dask-backed values are computed block by block, so a whole series never sits
        in memory.
    like : path or xarray.Dataset
        A store, or a Dataset from :func:`bigglm.open_run`: gives the mask, grid and TR.
    path : path
        Output file, ``.nii`` or ``.nii.gz``.
    fill : float, optional
        Value outside the mask. Default: NaN for floating-point values (so "no data" is
        never confused with 0), 0 for integer and boolean values.
    overwrite : bool
        Replace an image bigglm wrote before (its header's ``descrip`` says
        ``bigglm image``). Any other file at ``path`` is refused, whatever this says.

    Returns
    -------
    pathlib.Path
        The written file. It is written to a temporary file in the same folder and
        renamed into place, so ``path`` is never half-written.

    Raises
    ------
    StoreError
        If the values do not have one column per in-mask voxel, or ``path`` holds
        anything but an image bigglm wrote, or holds one and ``overwrite`` is False.

    Notes
    -----
    Floating-point values are written as float32 (float64 stays float64), booleans as
    uint8, integers in their own type. A 4D output whose rows are the run's volumes
    (``n`` equals the run's length, or the DataArray's first dimension is ``time``)
    carries the run's TR in ``pixdim[4]``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import nibabel, bigglm
    >>> src = Path(nibabel.__file__).parent / "tests" / "data" / "functional.nii"
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     mask = np.ones((17, 21, 3), bool)
    ...     ds = bigglm.open_run(bigglm.convert(src, Path(tmp) / "run.zarr", mask=mask))
    ...     out = to_nifti(ds.bold.mean("time"), ds, Path(tmp) / "mean.nii.gz")
    ...     nibabel.load(out).shape
    (17, 21, 3)
    """
    ds = like if isinstance(like, xr.Dataset) else open_run(like)
    mask = np.asarray(ds["mask"].values, dtype=bool)
    if isinstance(values, xr.DataArray) and "voxel" in values.dims:
        values = values.transpose(..., "voxel")
    is_series = _is_time_series(values, ds)
    data = values.data if isinstance(values, xr.DataArray) else values
    if not hasattr(data, "ndim"):
        data = np.asarray(data)
    _check_shape(data, int(mask.sum()), ds)
    dtype = _output_dtype(data.dtype)
    fill_value = fill if fill is not None else (np.nan if dtype.kind == "f" else 0)
    n = 1 if data.ndim == 1 else data.shape[0]
    shape = mask.shape if data.ndim == 1 else (*mask.shape, n)
    header = _header(shape, dtype, np.asarray(ds.attrs["affine"]), ds.attrs["tr"], is_series)
    target = Path(path).expanduser().resolve()
    with (
        writing(target, "image", overwrite=overwrite) as partial,
        _open_output(partial, target) as out,
    ):
        header.write_to(out)
        columns = np.asarray(np.ravel_multi_index(np.nonzero(mask), mask.shape, order="F"))
        for block in _blocks(data, n, mask.size * dtype.itemsize):
            out.write(_scatter(block, columns, mask.size, dtype, fill_value).tobytes())
            del block  # a view of a whole row of chunks: free it before the next row
    return target


def _is_time_series(values: Any, ds: xr.Dataset) -> bool:
    if isinstance(values, xr.DataArray) and values.ndim == 2:
        return values.dims[0] == "time"
    return getattr(values, "ndim", 0) == 2 and values.shape[0] == ds.sizes.get("time", -1)


def _check_shape(data: Any, n_voxels: int, ds: xr.Dataset) -> None:
    if data.ndim not in (1, 2) or data.shape[-1] != n_voxels:
        raise StoreError(
            f"values have shape {tuple(data.shape)}, but the mask of "
            f"{ds.attrs.get('store', 'the run')} has {n_voxels} voxels; expected "
            f"({n_voxels},) or (n, {n_voxels})"
        )


def _output_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind == "f" and dtype.itemsize != 8:
        return np.dtype(np.float32)
    return np.dtype(dtype).newbyteorder("=")


def _header(
    shape: tuple[int, ...], dtype: np.dtype[Any], affine: np.ndarray, tr: float, is_series: bool
) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(affine, code="aligned")
    header.set_qform(affine, code="aligned")
    header.set_xyzt_units("mm", "sec")
    if is_series:
        header["pixdim"][4] = tr
    header["vox_offset"] = _VOX_OFFSET
    header["descrip"] = marker("image").encode()
    return header


def _open_output(partial: Path, target: Path) -> IO[bytes]:
    if target.name.endswith(".gz"):
        return igzip.open(partial, "wb", compresslevel=1)
    return open(partial, "wb")


def _blocks(data: Any, n: int, volume_bytes: int) -> Any:
    """Rows of ``data`` as numpy blocks of about :data:`_WRITE_BLOCK_BYTES` of output.

    A dask array is computed one row of its chunks at a time (:func:`_chunk_rows`).

    Examples
    --------
    >>> import dask.array as da
    >>> [b.shape for b in _blocks(da.zeros((5, 2), chunks=(3, 1)), 5, volume_bytes=8)]
    [(3, 2), (2, 2)]
    """
    if data.ndim == 1:
        yield np.asarray(data)[None, :]
        return
    step = max(1, _WRITE_BLOCK_BYTES // max(volume_bytes, 1))
    if isinstance(data, da.Array):
        rows: Any = _chunk_rows(data)
    else:
        rows = (np.asarray(data[lo : lo + step]) for lo in range(0, n, step))
    for row in rows:
        for start in range(0, row.shape[0], step):
            yield row[start : start + step]
        del row  # before the next row is allocated


def _chunk_rows(data: da.Array, budget: int = _WRITE_BLOCK_BYTES) -> Any:
    """Each row of chunks of a 2D dask array, in order, every chunk computed once.

    A row is computed in groups of whole chunks of about ``budget`` bytes, so the
    workers hold one group of results at a time (a row of a large series can be bigger
    than a worker), and this process the row it assembles.

    Examples
    --------
    >>> import dask.array as da
    >>> data = da.from_array(np.arange(6).reshape(3, 2), chunks=(2, 1))
    >>> [r.tolist() for r in _chunk_rows(data)]
    [[[0, 1], [2, 3]], [[4, 5]]]
    >>> [r.tolist() for r in _chunk_rows(data, budget=1)]  # one chunk per group
    [[[0, 1], [2, 3]], [[4, 5]]]
    """
    row_edges = np.cumsum((0, *data.chunks[0])).tolist()
    column_edges = np.cumsum((0, *data.chunks[1])).tolist()
    for lo, hi in pairwise(row_edges):
        row = np.empty((hi - lo, data.shape[1]), dtype=data.dtype)
        width = max(1, budget // max(1, (hi - lo) * data.dtype.itemsize))
        first = 0
        for last in column_edges[1:]:
            if last - column_edges[first] >= width or last == data.shape[1]:
                left = column_edges[first]
                row[:, left:last] = data[lo:hi, left:last].compute()
                first = column_edges.index(last)
        yield row
        del row  # before the next row is allocated


def _scatter(
    rows: np.ndarray, columns: np.ndarray, n_voxels: int, dtype: np.dtype[Any], fill: float
) -> np.ndarray:
    """Place ``(n, V)`` rows at ``columns`` of ``(n, X*Y*Z)`` volumes (NIfTI's Fortran order)."""
    volumes = np.full((rows.shape[0], n_voxels), fill, dtype=dtype)
    volumes[:, columns] = rows
    return volumes
