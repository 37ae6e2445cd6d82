"""Damage detection in bigglm stores: per-chunk checksums and a complete set of chunks.

A store's arrays carry Zarr v3's ``crc32c`` codec after their compressor (:data:`CHECKSUM`):
each chunk file ends with the 4-byte little-endian CRC32C of the compressed bytes before
it, which Zarr checks when it decodes the chunk. And every chunk is written, one equal to
the fill value (all NaN) too, so a chunk file that is not there is damage, not NaN.

- :func:`check_chunks`: raise if a chunk file of an array is missing (a listing of the
  array's folder; no chunk is read); :func:`bigglm.open_run` and
  :func:`bigglm.io.verify_store` call it.
- :func:`checksummed_encoding`: the same checksum on every variable of a Dataset written
  by xarray (GLM result stores, :meth:`bigglm.GLMResult.to_zarr`).
- :class:`ChunkReader`: the ``getitem`` of the dask arrays over a store. A chunk that does
  not decode (checksum mismatch, decompression error) or whose file has gone since the
  store was opened is one :class:`~bigglm.exceptions.StoreError` naming the store and the
  chunk, raised in the dask task (it pickles, so it reaches the client from a worker).

Stores written before checksums (arrays without ``crc32c``) left all-NaN chunks out:
they still open, unchecked (no chunk is missing there, a decode error is still named).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from bigglm.exceptions import StoreDamaged, StoreError

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "CHECKSUM",
    "ChunkReader",
    "check_chunks",
    "checksummed",
    "checksummed_encoding",
    "chunk_key",
    "damaged",
]

#: The codec appended to every array's compressors: CRC32C of each encoded chunk.
CHECKSUM = Crc32cCodec()

#: Compressor of the variables xarray writes when none is set: Zarr 3.1's default.
_DEFAULT_COMPRESSOR = ZstdCodec(level=0)

#: How to repair a damaged store (the end of every message about one).
_FIX = "write the store again (bigglm.convert with overwrite=True)"


def checksummed(array: zarr.Array) -> bool:
    """Whether ``array`` carries :data:`CHECKSUM` (and so has every chunk written).

    Examples
    --------
    >>> a = zarr.create_array({}, shape=(2,), dtype="f4", compressors=[CHECKSUM])
    >>> checksummed(a), checksummed(zarr.create_array({}, shape=(2,), dtype="f4"))
    (True, False)
    """
    return any(isinstance(codec, Crc32cCodec) for codec in array.compressors)


def checksummed_encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """``to_zarr`` encoding giving every variable its compressor, then :data:`CHECKSUM`.

    A variable keeps the compressors it has (e.g. as read from a store); without any it
    gets Zarr's default, Zstandard level 0.

    Examples
    --------
    >>> import xarray as xr
    >>> checksummed_encoding(xr.Dataset({"beta": ("voxel", np.zeros(3))}))["beta"]
    {'compressors': (ZstdCodec(level=0, checksum=False), Crc32cCodec())}
    """
    encoding = {}
    for name, variable in ds.variables.items():
        given = tuple(variable.encoding.get("compressors") or (_DEFAULT_COMPRESSOR,))
        kept = tuple(c for c in given if not isinstance(c, Crc32cCodec))
        encoding[str(name)] = {"compressors": (*kept, CHECKSUM)}
    return encoding


def chunk_key(array: zarr.Array, coords: tuple[int, ...]) -> str:
    """The store key of the chunk at grid position ``coords``, e.g. ``bold/c/1/3``.

    Examples
    --------
    >>> a = zarr.create_array({}, name="bold", shape=(4, 4), chunks=(2, 2), dtype="f4")
    >>> chunk_key(a, (1, 0))
    'bold/c/1/0'
    """
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}".lstrip("/")


def damaged(store: str, key: str, reason: str) -> StoreDamaged:
    """The error for a damaged chunk: store, chunk, what is wrong, how to fix it.

    Examples
    --------
    >>> print(damaged("sub-01.zarr", "bold/c/1/3", "checksum mismatch"))
    sub-01.zarr: chunk bold/c/1/3 is damaged (checksum mismatch); write the store again ...
    """
    return StoreDamaged(f"{store}: chunk {key} is damaged ({reason}); {_FIX}", store)


def _local_folder(array: zarr.Array) -> Path | None:
    """The folder holding ``array``'s chunk files, if it is in a local directory store."""
    if not isinstance(array.store, LocalStore):
        return None
    return Path(array.store.root) / array.path


def _stored_files(folder: Path) -> set[str]:
    """The paths of the files under ``folder``, relative to it, with ``/`` separators."""
    found: set[str] = set()
    for top, _, files in os.walk(folder):
        prefix = os.path.relpath(top, folder).replace(os.sep, "/")
        found.update(name if prefix == "." else f"{prefix}/{name}" for name in files)
    return found


def check_chunks(array: zarr.Array, store: str) -> None:
    """Raise if a chunk of a checksummed ``array`` is not stored; read no chunk.

    In a local directory, one listing of the array's folder names the missing chunks;
    in another store, Zarr's count of stored chunks tells that some are missing.

    Raises
    ------
    StoreError
        Naming ``store``, the first missing chunk and how many are missing.

    Examples
    --------
    >>> a = zarr.create_array({}, name="x", shape=(4,), chunks=(2,), dtype="f4",
    ...                       compressors=[CHECKSUM], config={"write_empty_chunks": True})
    >>> a[:] = np.arange(4)
    >>> check_chunks(a, "memory")
    """
    if not checksummed(array):
        return
    folder = _local_folder(array)
    if folder is None:
        stored, expected = array.nchunks_initialized, array.nchunks
        if stored < expected:
            raise StoreDamaged(
                f"{store}: {expected - stored} of the {expected} chunks of {array.path!r} "
                f"are missing; {_FIX}",
                store,
            )
        return
    files = _stored_files(folder)
    grid = itertools.product(*(range(n) for n in array.cdata_shape))
    missing = [c for c in grid if array.metadata.encode_chunk_key(c) not in files]
    if missing:
        raise StoreDamaged(
            f"{store}: chunk {chunk_key(array, missing[0])} is missing ({len(missing)} of "
            f"the {array.nchunks} chunks of {array.path!r} are missing); {_FIX}",
            store,
        )


def _touched(array: zarr.Array, key: Any) -> list[tuple[int, ...]]:
    """Grid positions of the chunks a selection of contiguous slices reads; [] otherwise."""
    if not isinstance(key, tuple) or len(key) != array.ndim:
        return []
    ranges = []
    for part, size, extent in zip(key, array.chunks, array.shape, strict=True):
        if not isinstance(part, slice) or part.step not in (None, 1):
            return []
        start, stop, _ = part.indices(extent)
        ranges.append(range(start // size, -(-stop // size)))
    return list(itertools.product(*ranges))


def _reason(err: Exception) -> str:
    """A short description of a decoding error."""
    if "checksum" in str(err).lower():
        return "checksum mismatch"
    return f"cannot be decoded: {type(err).__name__}: {err}"


@dataclass(frozen=True)
class ChunkReader:
    """A dask ``getitem`` reading chunks of a store's array, naming any damaged one.

    Parameters
    ----------
    store : str
        The store's name in messages (its path).

    Examples
    --------
    >>> a = zarr.create_array({}, name="x", shape=(4,), chunks=(2,), dtype="f4")
    >>> a[:] = np.arange(4)
    >>> ChunkReader("memory")(a, (slice(2, 4),)).tolist()
    [2.0, 3.0]
    """

    store: str

    def __call__(self, array: zarr.Array, key: Any) -> np.ndarray:
        try:
            block = np.asarray(array[key])
        except (MemoryError, OSError):
            raise  # not damage: the machine or the filesystem
        except Exception as err:  # a decode error of any codec: name the chunk
            raise self._error(array, key, _reason(err)) from err
        folder = _local_folder(array) if checksummed(array) else None
        if folder is not None:
            for coords in _touched(array, key):
                if not (folder / array.metadata.encode_chunk_key(coords)).is_file():
                    raise damaged(self.store, chunk_key(array, coords), "its file is missing")
        return block

    def _error(self, array: zarr.Array, key: Any, reason: str) -> StoreError:
        """The error for a failed read of ``key``: one chunk in every read bigglm makes."""
        chunks = _touched(array, key)
        where = chunk_key(array, chunks[0]) if len(chunks) == 1 else f"{array.path} at {key}"
        return damaged(self.store, where, reason)
