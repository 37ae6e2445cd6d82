"""Writing per-column values back onto a run's original grid or surfaces.

:func:`to_nifti` for volume stores (geometry ``"voxel"``), :func:`to_gifti` (one file
per hemisphere) for GIFTI vertex stores, :func:`to_cifti` (a dense scalar file) for
CIFTI-2 grayordinate stores and vertex stores alike (:mod:`bigglm.io.store` has the
geometries). Every file is written to a temporary path beside its target and renamed
into place (:func:`bigglm.io.artefacts.writing`), marked as a bigglm image.
"""

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
from bigglm.io.artefacts import MARKER_KEY, check_replaceable, marker, writing
from bigglm.io.geometry import HEMISPHERES, geometry_of
from bigglm.io.store import open_run

__all__ = ["to_cifti", "to_gifti", "to_nifti"]

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
    ds = _run_like(like, ("voxel",), "to_nifti")
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


# --- surfaces ----------------------------------------------------------------------------

#: What each surface writer serves, and what to use instead.
_WRITER_OF = {"voxel": "to_nifti", "vertex": "to_gifti or to_cifti", "grayordinate": "to_cifti"}


def _run_like(like: Any, geometries: tuple[str, ...], writer: str) -> xr.Dataset:
    """The run's Dataset, refused with a message naming the right writer if its geometry
    is not one of ``geometries``."""
    ds = like if isinstance(like, xr.Dataset) else open_run(like)
    geometry = geometry_of(ds.attrs)
    if geometry not in geometries or (geometry == "voxel" and "mask" not in ds):
        raise StoreError(
            f"{ds.attrs.get('store', 'the run')} holds {geometry} columns, which {writer} "
            f"cannot place; write its maps with {_WRITER_OF.get(geometry, 'another writer')}"
        )
    return ds


def _rows(values: Any, ds: xr.Dataset) -> np.ndarray:
    """``values`` as an ``(n, V)`` numpy array (a map is one row), checked against ``ds``."""
    if isinstance(values, xr.DataArray) and "voxel" in values.dims:
        values = values.transpose(..., "voxel")
    data = values.data if isinstance(values, xr.DataArray) else values
    data = np.asarray(data)
    _check_shape(data, ds.sizes["voxel"], ds)
    return data[None, :] if data.ndim == 1 else data


def to_gifti(
    values: Any,
    like: str | os.PathLike[str] | xr.Dataset,
    path: str | os.PathLike[str] | dict[str, str | os.PathLike[str]],
    *,
    fill: float | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``(vertex,)`` values as one GIFTI map per hemisphere (``(n, vertex)``: n maps).

    The counterpart of :func:`to_nifti` for a store converted from GIFTI series.

    Parameters
    ----------
    values : array-like or xarray.DataArray
        One value per column of the store (a map), or ``n`` rows of them (one GIFTI data
        array each). Assembled in memory (``n x vertices`` values).
    like : path or xarray.Dataset
        A store of geometry ``"vertex"``, or its Dataset (:func:`bigglm.open_run`).
    path : path or dict
        ``{"L": left, "R": right}``; or one path holding ``{hemi}`` (formatted with
        ``L`` and ``R``) or a BIDS ``hemi-L``/``hemi-R`` entity (the other hemisphere's
        name has the other letter), conventionally ``*_hemi-L_..._statmap.shape.gii``;
        a store of one hemisphere takes any path.
    fill : float, optional
        Value of the vertices without a column (the medial wall). Default: NaN for
        floating-point values, 0 for integers and booleans.
    overwrite : bool
        Replace GIFTI files bigglm wrote; anything else at a path is refused.

    Returns
    -------
    dict
        The written file of each hemisphere.

    Raises
    ------
    StoreError
        If the store is not a vertex store, the values do not have one column per
        vertex of it, a path cannot be told per hemisphere, or a path holds anything but
        a bigglm image (or holds one and ``overwrite`` is False).

    Notes
    -----
    GIFTI holds float32, int32 and uint8 values: floating-point values are written as
    float32, integers as int32, booleans as uint8. Each file's metadata names the
    hemisphere (``AnatomicalStructurePrimary``: ``CortexLeft``, ``CortexRight``).

    Examples
    --------
    >>> import tempfile
    >>> ds = xr.Dataset(coords={"hemisphere": ("voxel", np.int8([0, 0, 1])),
    ...                         "vertex": ("voxel", np.int32([0, 2, 1]))},
    ...                 attrs={"geometry": "vertex", "hemispheres": {"L": 3, "R": 2}})
    >>> folder = Path(tempfile.mkdtemp())
    >>> out = to_gifti([1.0, 2.0, 3.0], ds, folder / "x_hemi-L_stat.shape.gii")
    >>> nib.load(out["L"]).darrays[0].data.tolist(), nib.load(out["R"]).darrays[0].data
    ([1.0, nan, 2.0], array([nan,  3.], dtype=float32))
    """
    from bigglm.io.gifti import STRUCTURES

    ds = _run_like(like, ("vertex",), "to_gifti")
    rows = _rows(values, ds)
    dtype = _gifti_dtype(rows.dtype)
    fill_value = fill if fill is not None else (np.nan if dtype.kind == "f" else 0)
    hemisphere = np.asarray(ds["hemisphere"].values)
    vertex = np.asarray(ds["vertex"].values)
    targets = _hemisphere_paths(path, list(ds.attrs["hemispheres"]))
    for target in targets.values():  # all refused before any is written
        check_replaceable(target, "image", overwrite=overwrite)
    written = {}
    for hemi, target in targets.items():
        n_vertices = int(ds.attrs["hemispheres"][hemi])
        mine = hemisphere == HEMISPHERES.index(hemi)
        maps = np.full((rows.shape[0], n_vertices), fill_value, dtype=dtype)
        maps[:, vertex[mine]] = rows[:, mine]
        meta = {"AnatomicalStructurePrimary": STRUCTURES[hemi], MARKER_KEY: marker("image")}
        image = nib.GiftiImage(meta=nib.gifti.GiftiMetaData(meta))
        for row in maps:
            image.add_gifti_data_array(nib.gifti.GiftiDataArray(row, intent="NIFTI_INTENT_NONE"))
        written[hemi] = target
        with writing(target, "image", overwrite=overwrite) as partial:
            partial.write_bytes(image.to_bytes())
    return written


def _gifti_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind in "iu":
        return np.dtype(np.int32)
    return np.dtype(np.float32)


def _hemisphere_paths(
    path: str | os.PathLike[str] | dict[str, str | os.PathLike[str]], hemis: list[str]
) -> dict[str, Path]:
    """The output file of each hemisphere of the store (see :func:`to_gifti`)."""
    if isinstance(path, dict):
        missing = [h for h in hemis if h not in path]
        if missing:
            raise StoreError(
                f"no output path for hemisphere {missing} (keys {sorted(path)}); give one "
                "path per hemisphere of the store"
            )
        return {h: Path(path[h]).expanduser().resolve() for h in hemis}
    text = str(Path(path).expanduser().resolve())
    if "{hemi}" in text:
        return {h: Path(text.replace("{hemi}", h)) for h in hemis}
    if len(hemis) == 1:
        return {hemis[0]: Path(text)}
    name = Path(text).name
    for given in HEMISPHERES:
        if f"hemi-{given}_" in name or f"hemi-{given}." in name:
            return {
                h: Path(text).with_name(name.replace(f"hemi-{given}", f"hemi-{h}")) for h in hemis
            }
    raise StoreError(
        f"{text}: one path for the hemispheres {hemis}; give a name with a BIDS hemi-L "
        "entity or a {hemi} placeholder, or {'L': left, 'R': right}"
    )


def to_cifti(
    values: Any,
    like: str | os.PathLike[str] | xr.Dataset,
    path: str | os.PathLike[str],
    *,
    names: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``(grayordinate,)`` values as a CIFTI-2 dense scalar file (``*.dscalar.nii``).

    Parameters
    ----------
    values : array-like or xarray.DataArray
        One value per column of the store (a map), or ``n`` rows of them (``n`` maps).
        Written as float32 (CIFTI-2 readers expect it); assembled in memory.
    like : path or xarray.Dataset
        A store of geometry ``"grayordinate"`` (from a CIFTI-2 series: its brain models,
        exactly) or ``"vertex"`` (from GIFTI: the surface vertices of its hemispheres,
        ``CIFTI_STRUCTURE_CORTEX_LEFT``/``RIGHT``), or its Dataset.
    path : path
        Output file, ending in ``.dscalar.nii``.
    names : list of str, optional
        One name per map (the scalar axis); default the DataArray's name, else ``map 0``,
        ``map 1``, ...
    overwrite : bool
        Replace an image bigglm wrote; anything else at ``path`` is refused.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    StoreError
        If the store is a volume store, the values do not have one column per
        grayordinate, the path does not end in ``.dscalar.nii``, ``names`` has the wrong
        length, or ``path`` holds anything but a bigglm image (or holds one and
        ``overwrite`` is False).

    Examples
    --------
    >>> import tempfile
    >>> ds = xr.Dataset(coords={"hemisphere": ("voxel", np.int8([0, 1])),
    ...                         "vertex": ("voxel", np.int32([2, 0]))},
    ...                 attrs={"geometry": "vertex", "hemispheres": {"L": 3, "R": 2}})
    >>> out = to_cifti([1.0, 2.0], ds, Path(tempfile.mkdtemp()) / "z.dscalar.nii")
    >>> image = nib.load(out)
    >>> image.shape, image.header.get_axis(1).vertex.tolist()
    ((1, 2), [2, 0])
    """
    from nibabel.cifti2 import cifti2_axes

    ds = _run_like(like, ("grayordinate", "vertex"), "to_cifti")
    target = Path(path).expanduser().resolve()
    if not target.name.endswith(".dscalar.nii"):
        raise StoreError(f"{target}: a CIFTI-2 dense scalar file's name ends in .dscalar.nii")
    rows = _rows(values, ds).astype(np.float32)
    labels = names or _map_names(values, rows.shape[0])
    if len(labels) != rows.shape[0]:
        raise StoreError(f"got {len(labels)} names for {rows.shape[0]} maps; give one per map")
    axes = (cifti2_axes.ScalarAxis(labels), _brain_models(ds))
    image = nib.Cifti2Image(rows, header=axes)
    image.nifti_header.set_intent("NIFTI_INTENT_CONNECTIVITY_DENSE_SCALARS")
    image.nifti_header["descrip"] = marker("image").encode()
    with writing(target, "image", overwrite=overwrite, suffix=".dscalar.nii") as partial:
        nib.save(image, partial)
    return target


def _map_names(values: Any, n: int) -> list[str]:
    name = getattr(values, "name", None)
    if n == 1 and isinstance(name, str):
        return [name]
    return [f"map {i}" for i in range(n)]


def _brain_models(ds: xr.Dataset) -> Any:
    """The CIFTI-2 brain model axis of a store's columns."""
    from nibabel.cifti2 import cifti2_axes

    from bigglm.io.cifti import brain_model_axis

    if geometry_of(ds.attrs) == "grayordinate":
        columns = {key: ds[key].values for key in ("structure", "vertex", "ijk")}
        return brain_model_axis(columns, ds.attrs["cifti"])
    from bigglm.io.gifti import STRUCTURES

    codes = np.asarray(ds["hemisphere"].values)
    full = {
        h: cifti2_axes.BrainModelAxis.to_cifti_brain_structure_name(STRUCTURES[h])
        for h in HEMISPHERES
    }
    names = np.array([full[HEMISPHERES[c]] for c in codes], dtype=object)
    return cifti2_axes.BrainModelAxis(
        names,
        vertex=np.asarray(ds["vertex"].values),
        nvertices={full[h]: int(n) for h, n in ds.attrs["hemispheres"].items()},
    )
