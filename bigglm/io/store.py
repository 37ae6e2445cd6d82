"""The bigglm store: a Zarr v3 group holding one run as ``bold(time, voxel)``.

Layout (the contract shared with the engine and the workflows):

- ``bold``: float32 ``(T, V)``, dimension names ``("time", "voxel")``, only in-mask
  voxels, chunked in both dimensions and compressed with :data:`BOLD_CODEC`;
- ``mask``: bool ``(X, Y, Z)``; ``i``, ``j``, ``k``: int32 ``(V,)`` voxel indices of the
  mask's True voxels in C order; ``time``: float64 ``(T,)`` frame onsets in seconds;
- group attributes: ``"bigglm"`` (affine, volume_shape, tr, units, sources,
  parameters, version, created) and ``"complete": true``, written last.

The columns of ``bold`` (the ``voxel`` dimension, so named whatever they are: the engine
fits columns) have one of three geometries, ``"bigglm"["geometry"]`` (absent in stores
of earlier versions: ``"voxel"``); each has its own per-column arrays
(:data:`bigglm.io.geometry.GEOMETRY_ARRAYS`):

- ``"voxel"``: in-mask voxels of a volume, as above (``mask``, ``i``, ``j``, ``k``);
- ``"vertex"``: vertices of cortical surface meshes (GIFTI, one file per hemisphere):
  ``hemisphere`` int8 ``(V,)``, the index of the column's hemisphere in
  :data:`HEMISPHERES` (0 left, 1 right), and ``vertex`` int32 ``(V,)``, its vertex on
  that hemisphere's mesh; columns are the left hemisphere's kept vertices, then the
  right's, each in increasing vertex order. ``"bigglm"["hemispheres"]`` maps each
  hemisphere present to its mesh's vertex count (``{"L": 10242, "R": 10242}``).
  Vertices left out (the medial wall: constant over time, or outside a given mask) have
  no column. No ``mask``, ``i``, ``j``, ``k``, ``affine`` or ``volume_shape``.
- ``"grayordinate"``: the brain models of a CIFTI-2 dense series, every grayordinate in
  the file's order: ``structure`` int16 ``(V,)`` (index into
  ``"bigglm"["cifti"]["structures"]``, CIFTI structure names), ``vertex`` int32 ``(V,)``
  (the surface vertex, -1 for a voxel) and ``ijk`` int32 ``(V, 3)`` (the voxel indices,
  -1 for a vertex). ``"bigglm"["cifti"]`` also holds ``nvertices`` (surface vertex count
  per surface structure), ``affine`` and ``volume_shape`` of the voxel grid (None
  without voxels) and the series axis (``start``, ``step``, ``unit``): together exactly
  what rebuilds nibabel's ``BrainModelAxis`` (:func:`bigglm.io.cifti.brain_model_axis`).

Every array carries Zarr v3's ``crc32c`` codec after its compressor, and every chunk is
written, all-NaN ones too (:mod:`bigglm.io.integrity`): :func:`open_run` refuses a store
with a missing chunk file, a chunk that fails its checksum is an error naming it when
read, and :func:`verify_store` checks a store without fitting it.

A store is built in a hidden staging sibling directory and renamed into place only
when complete (:func:`bigglm.io.artefacts.writing`, which also decides what may be
replaced), so an interrupted conversion never leaves anything at the target path, let
alone something that opens as complete.
"""

from __future__ import annotations

import datetime
import logging
import os
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask.array as da
import google_crc32c
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from bigglm.exceptions import StoreError
from bigglm.io.geometry import GEOMETRY_ARRAYS, geometry_of
from bigglm.io.integrity import CHECKSUM, ChunkReader, check_chunks

__all__ = [
    "BOLD_CODEC",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_TIME_CHUNK",
    "ChunkRowWriter",
    "StoreWriter",
    "choose_chunks",
    "create_chunked",
    "create_columns",
    "create_grid",
    "create_small",
    "lazy_array",
    "open_layout",
    "open_run",
    "read_small",
    "run_attributes",
    "verify_store",
]

logger = logging.getLogger(__name__)

#: Volumes per ``bold`` chunk unless the caller says otherwise.
DEFAULT_TIME_CHUNK = 128

#: Uncompressed size aimed at for one ``bold`` chunk (16 MiB: 128 volumes x 32768 voxels).
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024

#: Codec of ``bold``: Blosc with LZ4 after bit-shuffling, chosen by read speed: a fit
#: reads at min(decode speed, disk speed x ratio), and bit-shuffle stores more compactly
#: than plain shuffle while decoding fast enough for any disk or network filesystem
#: (README.md, "Store layout and damage detection", has the measurement).
BOLD_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")

#: Codec of the small arrays (mask, coordinates, time).
_SMALL_CODEC = ZstdCodec(level=3)

#: How every array of a store is created: a checksum after the compressor, and every
#: chunk written, one equal to the fill value too (so that a missing chunk is damage).
_CHECKED: dict[str, Any] = {"config": {"write_empty_chunks": True}}

#: Arrays every store holds, whatever its geometry.
_BASE_ARRAYS = ("bold", "time")


#: Threads encoding the chunks of a row of ``bold`` chunks (:meth:`StoreWriter.write`).
ENCODE_THREADS = 2

_COMPLETE = "complete"
_ATTRS = "bigglm"


def choose_chunks(
    n_volumes: int,
    n_voxels: int,
    time_chunk: int | None = None,
    voxel_chunk: int | None = None,
) -> tuple[int, int]:
    """Chunk shape ``(time, voxel)`` for ``bold``: about 16 MiB per chunk by default.

    Parameters
    ----------
    n_volumes, n_voxels : int
        Shape of ``bold``.
    time_chunk, voxel_chunk : int, optional
        Requested sizes; each is capped at the array's extent.

    Returns
    -------
    tuple of int
        ``(time_chunk, voxel_chunk)``.

    Examples
    --------
    >>> choose_chunks(400, 235_000)
    (128, 32768)
    >>> choose_chunks(20, 1071)
    (20, 1071)
    """
    for name, value in (("time_chunk", time_chunk), ("voxel_chunk", voxel_chunk)):
        if value is not None and value < 1:
            raise StoreError(f"{name} must be a positive integer, got {value}")
    tc = min(time_chunk or DEFAULT_TIME_CHUNK, n_volumes)
    if voxel_chunk is None:
        voxel_chunk = max(1024, DEFAULT_CHUNK_BYTES // (4 * tc) // 1024 * 1024)
    return tc, min(voxel_chunk, n_voxels)


class StoreWriter:
    """Create the arrays of a store in ``path`` and fill ``bold`` chunk row by chunk row.

    Parameters
    ----------
    path : pathlib.Path
        An empty directory (the staging directory).
    mask : numpy.ndarray or mapping
        Boolean ``(X, Y, Z)`` mask, ``bold`` getting one column per True voxel; or, for
        a surface geometry, its per-column arrays by name (:func:`create_columns`).
    n_volumes : int
        Number of volumes ``T``.
    tr : float
        Repetition time (s); ``time = arange(T) * tr``.
    chunks : tuple of int
        ``bold`` chunk shape ``(time, voxel)``.

    Examples
    --------
    >>> import tempfile
    >>> mask = np.zeros((2, 2, 2), bool); mask[0] = True
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     writer = StoreWriter(Path(tmp), mask, n_volumes=3, tr=2.0, chunks=(2, 4))
    ...     writer.write(0, np.ones((2, 4), np.float32))
    ...     writer.write(2, np.zeros((1, 4), np.float32))
    ...     writer.finish({"tr": 2.0})
    ...     open_run(tmp).bold.shape
    (3, 4)
    """

    def __init__(
        self,
        path: Path,
        mask: np.ndarray | Mapping[str, np.ndarray],
        *,
        n_volumes: int,
        tr: float,
        chunks: tuple[int, int],
    ) -> None:
        self.path = path
        self.group = zarr.open_group(path, mode="w-", zarr_format=3)
        if isinstance(mask, Mapping):
            n_voxels = create_columns(self.group, mask)
        else:
            n_voxels = int(mask.sum())
            create_grid(self.group, mask)
        self.bold = create_chunked(
            self.group,
            "bold",
            (n_volumes, n_voxels),
            chunks,
            ("time", "voxel"),
            units="arbitrary (scaled source values)",
        )
        create_small(
            self.group, "time", np.arange(n_volumes, dtype=np.float64) * tr, ("time",), units="s"
        )
        self._rows = ChunkRowWriter(self.bold, path / "bold")

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (``(n, V)`` float32) at volume ``start`` (:class:`ChunkRowWriter`)."""
        self._rows.write(start, rows)

    def finish(self, attrs: Mapping[str, Any]) -> None:
        """Write the metadata, then the completion flag (last)."""
        self.group.attrs.update({_ATTRS: dict(attrs)})
        self.group.attrs.update({_COMPLETE: True})


def run_attributes(
    *,
    tr: float,
    units: Mapping[str, str],
    sources: list[dict[str, Any]],
    parameters: Mapping[str, Any],
    **geometry: Any,
) -> dict[str, Any]:
    """The ``"bigglm"`` attributes of a run store: its geometry's, then the common ones.

    ``geometry`` holds what the geometry records (``affine`` and ``volume_shape`` of a
    volume; ``geometry`` and ``hemispheres`` or ``cifti`` of a surface; module notes).

    Examples
    --------
    >>> attrs = run_attributes(tr=2.0, units={"time": "s"}, sources=[], parameters={},
    ...                        geometry="vertex", hemispheres={"L": 4})
    >>> attrs["geometry"], attrs["tr"], sorted(attrs)[:3]
    ('vertex', 2.0, ['created', 'geometry', 'hemispheres'])
    """
    from bigglm import __version__

    return {
        **geometry,
        "tr": tr,
        "units": dict(units),
        "sources": sources,
        "parameters": dict(parameters),
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def create_chunked(
    group: zarr.Group,
    name: str,
    shape: tuple[int, int],
    chunks: tuple[int, int],
    dims: tuple[str, str],
    *,
    units: str,
) -> zarr.Array:
    """A float32 array of voxel data as every bigglm store holds them.

    Compressed with :data:`BOLD_CODEC` then the ``crc32c`` checksum, NaN as fill value,
    and every chunk written, all-NaN ones too (a missing chunk file is then damage).
    Writers that reopen the array must keep writing empty chunks
    (``zarr.config.set({"array.write_empty_chunks": True})``).

    Examples
    --------
    >>> group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    >>> create_chunked(group, "effect", (4, 10), (2, 5), ("subject", "voxel"), units="a").chunks
    (2, 5)
    """
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype="float32",
        compressors=(BOLD_CODEC, CHECKSUM),
        fill_value=np.nan,
        dimension_names=dims,
        attributes={"units": units},
        **_CHECKED,
    )


def create_small(
    group: zarr.Group,
    name: str,
    data: np.ndarray,
    dims: tuple[str, ...],
    units: str | None = None,
) -> None:
    """A small array (mask, coordinates), in one checksummed chunk.

    Examples
    --------
    >>> group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    >>> create_small(group, "n", np.arange(3), ("voxel",))
    >>> group["n"][:].tolist()
    [0, 1, 2]
    """
    group.create_array(
        name,
        data=data,
        chunks=data.shape,
        compressors=(_SMALL_CODEC, CHECKSUM),
        dimension_names=dims,
        attributes={"units": units} if units else {},
        **_CHECKED,
    )


def create_grid(group: zarr.Group, mask: np.ndarray) -> None:
    """The voxel grid of a store: ``mask(x, y, z)`` and the indices ``i, j, k`` of its voxels.

    Examples
    --------
    >>> group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    >>> create_grid(group, np.eye(2, dtype=bool)[:, :, None])
    >>> group["j"][:].tolist()
    [0, 1]
    """
    create_small(group, "mask", mask.astype(bool), ("x", "y", "z"))
    for name, index in zip("ijk", np.nonzero(mask), strict=True):
        create_small(group, name, index.astype(np.int32), ("voxel",))


def create_columns(group: zarr.Group, columns: Mapping[str, np.ndarray]) -> int:
    """The per-column arrays of a surface geometry (``hemisphere``, ``vertex``, ...).

    Each array has one row per column of ``bold`` (dimension ``voxel``); a 2D one (the
    ``ijk`` of grayordinates) has a second dimension ``axis``. Returns the column count.

    Examples
    --------
    >>> group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    >>> create_columns(group, {"hemisphere": np.zeros(3, np.int8), "vertex": np.arange(3)})
    3
    """
    counts = {len(array) for array in columns.values()}
    if len(counts) != 1:
        raise ValueError(f"per-column arrays of lengths {sorted(counts)}; expected one length")
    for name, array in columns.items():
        create_small(group, name, np.asarray(array), ("voxel", "axis")[: np.ndim(array)])
    return counts.pop()


class ChunkRowWriter:
    """Write rows of whole chunks of a 2D float32 array, every chunk, all-NaN ones too.

    A row of whole chunks (``start`` on a chunk boundary, as many rows as a chunk or the
    rest of the array) is encoded here and each chunk's bytes written to its file,
    exactly as Zarr would write them (same codecs and checksum, NaN padding at the edges),
    without Zarr's per-chunk copies and event loop: about half the CPU of
    ``array[...] = rows``, and chunks equal to the fill value are written too, which
    Zarr skips unless configured otherwise (a missing chunk is then damage, not
    emptiness). Anything else goes through Zarr.

    Parameters
    ----------
    array : zarr.Array
        Float32, two-dimensional, in a local directory.
    folder : pathlib.Path
        The array's folder.

    Examples
    --------
    >>> import tempfile
    >>> group = zarr.open_group(tempfile.mkdtemp(), mode="w")
    >>> a = create_chunked(group, "x", (4, 3), (2, 2), ("subject", "voxel"), units="a")
    >>> ChunkRowWriter(a, Path(group.store.root) / "x").write(0, np.full((2, 3), np.nan, "f4"))
    >>> sorted(p.name for p in (Path(group.store.root) / "x" / "c" / "0").iterdir())
    ['0', '1']
    """

    def __init__(self, array: zarr.Array, folder: Path) -> None:
        self.array = array
        self._folder = folder
        self._encoder = _chunk_encoder(array)
        self._tiles: list[np.ndarray] = []

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (``(n, V)`` float32) at row ``start``: whole chunks only."""
        if not self._write_chunk_row(start, rows):
            self.array[start : start + rows.shape[0], :] = rows

    def _write_chunk_row(self, start: int, rows: np.ndarray) -> bool:
        """Encode and write a row of whole chunks; False if ``rows`` is not one.

        The chunks are shared out between :data:`ENCODE_THREADS` threads (Blosc releases
        the GIL), each copying its chunks into a tile of its own.
        """
        n_rows, n_columns = self.array.shape
        row_chunk, column_chunk = self.array.chunks
        n = rows.shape[0]
        whole = start % row_chunk == 0 and (n == row_chunk or start + n == n_rows)
        encoder = self._encoder
        if encoder is None or not whole or rows.shape[1] != n_columns or n == 0:
            return False
        firsts = list(range(0, n_columns, column_chunk))
        workers = min(ENCODE_THREADS, len(firsts))
        while len(self._tiles) < workers:
            self._tiles.append(np.empty((row_chunk, column_chunk), dtype=np.float32))
        jobs = [
            (encoder, self._tiles[w], list(enumerate(firsts))[w::workers]) for w in range(workers)
        ]
        if workers == 1:
            self._encode_chunks(start // row_chunk, rows, *jobs[0])
            return True
        with ThreadPoolExecutor(workers, thread_name_prefix="bigglm-encode") as pool:
            done = [pool.submit(self._encode_chunks, start // row_chunk, rows, *j) for j in jobs]
            for future in done:
                future.result()
        return True

    def _encode_chunks(
        self,
        row: int,
        rows: np.ndarray,
        encoder: _ChunkEncoder,
        tile: np.ndarray,
        chunks: list[tuple[int, int]],
    ) -> None:
        """Encode and write the chunks ``(index, first column)`` of chunk row ``row``."""
        n = rows.shape[0]
        tile[n:] = np.nan  # the fill value, where a chunk overhangs the array's end
        for index, first in chunks:
            width = min(tile.shape[1], rows.shape[1] - first)
            tile[:n, :width] = rows[:, first : first + width]
            tile[:n, width:] = np.nan
            key = self._folder / self.array.metadata.encode_chunk_key((row, index))
            key.parent.mkdir(parents=True, exist_ok=True)
            with open(key, "wb") as out:
                out.write(encoder.encode(tile))


class _ChunkEncoder:
    """Blosc then, optionally, the CRC32C Zarr's ``crc32c`` codec appends (4 bytes, LE)."""

    def __init__(self, blosc: Any, checksum: bool) -> None:
        self.blosc, self.checksum = blosc, checksum

    def encode(self, tile: np.ndarray) -> bytes:
        data = bytes(self.blosc.encode(tile))
        if not self.checksum:
            return data
        return data + struct.pack("<I", google_crc32c.value(data))


def _chunk_encoder(array: zarr.Array) -> _ChunkEncoder | None:
    """An encoder giving the bytes Zarr writes for ``array``'s chunks, if it can.

    That is when the array lives in a local directory, is little-endian float32 and its
    codecs are ``bytes``, ``blosc`` and optionally ``crc32c`` (as ``bold``); else None.
    """
    from numcodecs import Blosc

    compressors = array.compressors
    serializer = array.serializer
    if (
        array.metadata.zarr_format != 3
        or not isinstance(array.store, LocalStore)
        or array.dtype != np.dtype("<f4")
        or array.filters
        or not isinstance(serializer, BytesCodec)
        or _option(serializer.endian) not in ("little", None)
        or not compressors
        or not isinstance(compressors[0], BloscCodec)
        or not all(isinstance(c, Crc32cCodec) for c in compressors[1:2])
        or len(compressors) > 2
    ):
        return None
    blosc = compressors[0]
    shuffle = {
        "noshuffle": Blosc.NOSHUFFLE,
        "shuffle": Blosc.SHUFFLE,
        "bitshuffle": Blosc.BITSHUFFLE,
    }[_option(blosc.shuffle)]
    encoder = Blosc(
        cname=_option(blosc.cname),
        clevel=blosc.clevel,
        shuffle=shuffle,
        blocksize=blosc.blocksize,
        typesize=blosc.typesize,
    )
    return _ChunkEncoder(encoder, checksum=len(compressors) == 2)


def _option(value: Any) -> Any:
    """A codec option as its JSON string: zarr 3.1 gives enums (``Endian.little``), later
    releases the strings themselves (``"little"``)."""
    return getattr(value, "value", value)


def _open_group(store: Any) -> tuple[zarr.Group, str]:
    """Open a store read-only; a path must be a directory holding a Zarr group."""
    if isinstance(store, str | os.PathLike):
        path = Path(store).expanduser().resolve()
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a bigglm store (no zarr.json); convert a run first")
        store, name = str(path), str(path)
    else:
        name = str(store)
    try:
        group = zarr.open_group(store, mode="r")
    except Exception as err:
        raise StoreError(f"{name}: cannot open as a Zarr group ({err})") from err
    return group, name


def _array(group: zarr.Group, key: str, name: str) -> zarr.Array:
    """The array ``key`` of a store, or a StoreError naming the store."""
    try:
        array = group[key]
    except KeyError:
        array = None
    if not isinstance(array, zarr.Array):
        raise StoreError(f"{name}: has no array {key!r}; it is not a bigglm store, convert again")
    return array


def open_run(store: str | os.PathLike[str] | Any) -> xr.Dataset:
    """Open a converted run lazily as an xarray Dataset.

    No voxel data are read: ``bold`` is a dask array over the store's chunks (workers read
    the chunks themselves when the graph runs, through
    :class:`~bigglm.io.integrity.ChunkReader`); ``mask`` is lazy too. The small coordinate
    arrays (``time``, ``i``, ``j``, ``k``) are read.

    Parameters
    ----------
    store : path or zarr store
        A store written by :func:`bigglm.convert`.

    Returns
    -------
    xarray.Dataset
        ``bold(time, voxel)`` float32 and ``mask(x, y, z)``; coordinates ``time`` (s),
        ``voxel``, ``i``, ``j``, ``k``; attrs ``affine``, ``tr``, ``volume_shape``,
        ``sources``, ``parameters``, ``version``, ``store``. A surface store (module
        notes) has no ``mask``: its geometry's arrays are coordinates along ``voxel``
        (``hemisphere``, ``vertex``; or ``structure``, ``vertex``, ``ijk``), and its
        attrs ``geometry`` with ``hemispheres`` or ``cifti`` instead of the grid's.

    Raises
    ------
    StoreError
        If the path is not a bigglm store, the store is incomplete, or a chunk file is
        missing (a listing, no chunk read). Reading a chunk that fails its checksum or
        does not decode raises one too, naming the chunk (in the dask task).

    Examples
    --------
    >>> import tempfile
    >>> mask = np.ones((2, 1, 1), bool)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     writer = StoreWriter(Path(tmp), mask, n_volumes=2, tr=1.5, chunks=(2, 2))
    ...     writer.write(0, np.eye(2, dtype=np.float32))
    ...     writer.finish({"tr": 1.5})
    ...     ds = open_run(tmp)
    ...     ds.bold.dims, ds.time.values.tolist(), ds.i.values.tolist()
    (('time', 'voxel'), [0.0, 1.5], [0, 1])
    """
    group, name, arrays = _open_run_layout(store)
    meta: dict[str, Any] = dict(group.attrs[_ATTRS])  # type: ignore[arg-type]
    bold = lazy_array(arrays["bold"], name)
    coords: dict[str, Any] = {
        "time": ("time", read_small(arrays["time"], name), {"units": "s"}),
        "voxel": ("voxel", np.arange(bold.shape[1], dtype=np.int64)),
    }
    variables: dict[str, Any] = {"bold": (("time", "voxel"), bold)}
    for key in GEOMETRY_ARRAYS[geometry_of(meta)]:
        if key == "mask":
            variables["mask"] = (("x", "y", "z"), lazy_array(arrays["mask"], name))
        else:
            coords[key] = (("voxel", "axis")[: arrays[key].ndim], read_small(arrays[key], name))
    return xr.Dataset(variables, coords=coords, attrs={**meta, "store": name})


def _open_run_layout(store: Any) -> tuple[zarr.Group, str, dict[str, zarr.Array]]:
    """:func:`open_layout` for a run store, with the arrays of the geometry it records."""
    every = tuple(dict.fromkeys(k for keys in GEOMETRY_ARRAYS.values() for k in keys))
    group, name, arrays = open_layout(store, _BASE_ARRAYS, every)
    geometry = geometry_of(group.attrs[_ATTRS])  # type: ignore[arg-type]
    if geometry not in GEOMETRY_ARRAYS:
        raise StoreError(
            f"{name}: geometry {geometry!r} is not one this version of bigglm knows "
            f"({', '.join(GEOMETRY_ARRAYS)}); upgrade bigglm or convert the run again"
        )
    for key in GEOMETRY_ARRAYS[geometry]:
        _array(group, key, name)  # a StoreError naming the store if it is missing
    return group, name, arrays


def open_layout(
    store: Any,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
    *,
    redo: str = "convert the run again with overwrite=True",
) -> tuple[zarr.Group, str, dict[str, zarr.Array]]:
    """Open a store and check its structure: completion flag, arrays, every chunk file.

    Reads no chunk: the chunk files are listed (one walk of each array's folder).

    Parameters
    ----------
    store : path or zarr store
    required : tuple of str
        Arrays the layout holds (``bold``, ``mask``, ...).
    optional : tuple of str
        Arrays it may hold; those present are returned and checked too.
    redo : str
        What the message of an incomplete store tells the user to do.

    Returns
    -------
    group, name, arrays
        The open group, the store's name for messages, and its arrays by name.

    Raises
    ------
    StoreError
        Not a store, incomplete, an array missing, or a chunk file missing.
    """
    group, name = _open_group(store)
    attrs = group.attrs.asdict()
    if attrs.get(_COMPLETE) is not True or _ATTRS not in attrs:
        raise StoreError(
            f"{name}: incomplete store (no completion flag): it was interrupted or failed "
            f"while being written; {redo}"
        )
    arrays = {key: _array(group, key, name) for key in required}
    arrays.update({key: _array(group, key, name) for key in optional if key in group})
    for array in arrays.values():
        check_chunks(array, name)
    return group, name, arrays


def lazy_array(array: zarr.Array, name: str) -> da.Array:
    """A dask array over ``array``'s chunks, read by :class:`~bigglm.io.integrity.ChunkReader`.

    No chunk is read until the graph runs (then by the workers, each its own chunks).
    """
    token = tokenize(name, array.path, array.shape, array.chunks, array.metadata.to_dict())
    return da.from_array(
        array, chunks=array.chunks, name=f"bigglm-read-{token}", getitem=ChunkReader(name)
    )


def read_small(array: zarr.Array, name: str) -> np.ndarray:
    """All of a small array, as :class:`~bigglm.io.integrity.ChunkReader` reads it."""
    return ChunkReader(name)(array, tuple(slice(None) for _ in array.shape))


def verify_store(store: str | os.PathLike[str] | Any, *, full: bool = False) -> None:
    """Check that a store is whole: structure always, every chunk's checksum if ``full``.

    The structural check is what :func:`open_run` does: the completion flag, the arrays
    of the layout, and every chunk file present (a listing of each array's folder, no
    chunk read: milliseconds). ``full=True`` also reads and decodes every chunk, which
    checks its CRC32C: as long as reading the whole store once.

    Parameters
    ----------
    store : path or zarr store
        A store written by :func:`bigglm.convert`.
    full : bool
        Also decode every chunk.

    Raises
    ------
    StoreError
        Naming the store and what is wrong with it: not a store, incomplete, an array
        missing, or the first missing or damaged chunk.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     writer = StoreWriter(Path(tmp), np.ones((2, 1, 1), bool), n_volumes=2, tr=1.0,
    ...                          chunks=(1, 2))
    ...     writer.write(0, np.zeros((1, 2), np.float32))
    ...     writer.write(1, np.ones((1, 2), np.float32))
    ...     writer.finish({"tr": 1.0})
    ...     verify_store(tmp, full=True)
    ...     (Path(tmp) / "bold" / "c" / "1" / "0").unlink()
    ...     verify_store(tmp)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    bigglm.exceptions.StoreDamaged: ...: chunk bold/c/1/0 is missing (1 of the 2 chunks ...
    """
    _, name, arrays = _open_run_layout(store)
    if not full:
        return
    read = ChunkReader(name)
    for array in arrays.values():
        for coords in np.ndindex(*array.cdata_shape):
            block = tuple(
                slice(c * n, min((c + 1) * n, extent))
                for c, n, extent in zip(coords, array.chunks, array.shape, strict=True)
            )
            read(array, block)
    logger.info("%s: every chunk decodes and matches its checksum", name)
