"""Reading NIfTI sources: validation up front, then one sequential stream of volume blocks.

A source is either one 4D file (``.nii`` or ``.nii.gz``) or an ordered list of 3D
files on the same grid. :func:`inspect_sources` reads only the headers and checks
everything that can be checked before any data are read; :class:`VolumeStream` then
reads the voxel data exactly once, front to back, in blocks of whole volumes, and
computes each file's SHA-256 from the very bytes it reads.

Gzip-compressed files are decompressed with ISA-L (:mod:`isal.igzip`) through one
decompressor per file, read sequentially: seeking inside a gzip stream (what an
array proxy does when sliced) restarts decompression from the start of the file.

The SHA-256 runs in a thread of its own (``hashlib`` releases the GIL), one piece of
the file behind the read, so that hashing (about 1.5 GB/s on one core) overlaps with
reading or decompressing and with the rest of the conversion.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip

from bigglm.exceptions import StoreError, not_a_regular_file

__all__ = [
    "SourceFile",
    "SourceSeries",
    "VolumeStream",
    "inspect_map",
    "inspect_sources",
    "load_mask",
    "read_map",
]

logger = logging.getLogger(__name__)

#: Seconds per unit of the NIfTI ``xyzt_units`` time field.
_TIME_UNIT_SECONDS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}

#: Largest affine difference (mm) for two files to count as the same grid.
#: NIfTI stores the affine as float32, so files written by different tools from the
#: same grid can differ in the last bits; real grid differences are far larger.
AFFINE_TOLERANCE = 1e-4

#: Largest TR (s) believed from a header; a larger one is almost surely in ms mislabelled
#: as s (nibabel's example4d.nii.gz has pixdim[4] = 2000 with unit "sec").
MAX_HEADER_TR = 100.0

#: Size of one raw read from disk (bytes): each is hashed while the next is read.
_READ_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class SourceFile:
    """One NIfTI file of a source series, as described by its header.

    Attributes
    ----------
    path : pathlib.Path
        Absolute path of the file.
    n_volumes : int
        Number of volumes it holds (1 for a 3D file).
    offset : int
        Byte offset of the voxel data in the (decompressed) file.
    dtype : numpy.dtype
        On-disk data type, with its byte order.
    slope, inter : float
        Scaling applied to the stored values (1 and 0 when the header has none).
    compressed : bool
        Whether the file is gzip-compressed.
    """

    path: Path
    n_volumes: int
    offset: int
    dtype: np.dtype[Any]
    slope: float
    inter: float
    compressed: bool


@dataclass(frozen=True)
class SourceSeries:
    """A validated series of volumes: one 4D file or an ordered list of 3D files.

    Attributes
    ----------
    files : tuple of SourceFile
        The files, in time order.
    volume_shape : tuple of int
        ``(X, Y, Z)``.
    affine : numpy.ndarray
        The 4x4 voxel-to-world affine.
    tr : float
        Repetition time in seconds.
    tr_from : str
        ``"header"`` or ``"argument"``: where ``tr`` came from.
    space_unit : str
        The header's spatial unit (``"mm"``, ``"meter"``, ``"micron"`` or ``"unknown"``).
    """

    files: tuple[SourceFile, ...]
    volume_shape: tuple[int, int, int]
    affine: np.ndarray
    tr: float
    tr_from: str
    space_unit: str = "mm"

    @property
    def n_volumes(self) -> int:
        """Total number of volumes (time points)."""
        return sum(f.n_volumes for f in self.files)

    @property
    def voxels_per_volume(self) -> int:
        """Number of voxels in one volume, ``X * Y * Z``."""
        return int(np.prod(self.volume_shape))


def _load_header(path: Path) -> nib.Nifti1Image:
    """Open ``path`` with nibabel (header only) or raise a StoreError naming it."""
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, not a NIfTI file; give the .nii/.nii.gz inside")
    problem = not_a_regular_file(path)
    if problem == "does not exist":
        raise StoreError(f"{path}: no such file; check the path")
    if problem:
        raise StoreError(f"{path}: {problem}; give a .nii/.nii.gz file")
    if not os.access(path, os.R_OK):
        raise StoreError(f"{path}: file is not readable; check its permissions")
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises many types for bad files
        raise StoreError(f"{path}: cannot be read as NIfTI ({err}); is it a .nii/.nii.gz?") from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise StoreError(f"{path}: is a {type(img).__name__}, not NIfTI; convert it to NIfTI first")
    return img


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _describe(path: Path, img: nib.Nifti1Image) -> SourceFile:
    """Describe the data layout of one opened file."""
    proxy: Any = img.dataobj
    slope = float(proxy.slope) if np.isfinite(proxy.slope) and proxy.slope != 0 else 1.0
    inter = float(proxy.inter) if np.isfinite(proxy.inter) else 0.0
    shape = img.shape
    n_volumes = 1 if len(shape) == 3 else int(np.prod(shape[3:]))
    return SourceFile(
        path=path,
        n_volumes=n_volumes,
        offset=int(proxy.offset),
        dtype=img.header.get_data_dtype(),
        slope=slope,
        inter=inter,
        compressed=_is_gzip(path),
    )


def _header_tr(path: Path, img: nib.Nifti1Image) -> float | None:
    """TR in seconds from ``pixdim[4]`` and the time unit, or None when absent.

    A 3D file has no time axis, so its ``pixdim[4]`` (often a default 1) is not a TR.
    """
    if img.header["dim"][0] < 4:
        return None
    value = float(img.header["pixdim"][4])
    if not np.isfinite(value) or value <= 0:
        return None
    unit = img.header.get_xyzt_units()[1]
    if unit == "unknown":
        logger.info("%s: time unit not set in header; reading pixdim[4]=%g as seconds", path, value)
    return value * _TIME_UNIT_SECONDS.get(unit, 1.0)


def _check_dtype(source: SourceFile) -> None:
    """Only real numbers can become float32 BOLD values."""
    if source.dtype.kind not in "iuf" or source.dtype.fields is not None:
        raise StoreError(
            f"{source.path}: voxels of type {source.dtype} are not real numbers; a BOLD "
            "series must be integer or floating point"
        )


def _tr_problem(img: nib.Nifti1Image) -> str:
    if img.header["dim"][0] < 4:
        return "3D volumes carry none"
    return f"pixdim[4] is {img.header['pixdim'][4]}"


def _check_uncompressed_size(source: SourceFile, volume_shape: tuple[int, ...]) -> None:
    """Raise if an uncompressed file is shorter than its header says (truncated)."""
    if source.compressed:
        return
    needed = source.offset + source.n_volumes * int(np.prod(volume_shape)) * source.dtype.itemsize
    size = source.path.stat().st_size
    if size < needed:
        raise StoreError(
            f"{source.path}: truncated: the header describes {needed} bytes but the file has "
            f"{size}; re-copy or re-export the file"
        )


def _same_grid(affine_a: np.ndarray, affine_b: np.ndarray) -> bool:
    return bool(np.allclose(affine_a, affine_b, rtol=0.0, atol=AFFINE_TOLERANCE))


_RESAMPLE_MASK = "resample the mask to the functional grid (nearest neighbour)"


def _check_affine(
    path: Path, affine: np.ndarray, reference: np.ndarray, *, differs: str, fix: str
) -> None:
    """Raise :class:`StoreError` unless ``affine`` is on ``reference``'s grid.

    The message is ``"{path}: {differs} (largest difference ... mm); {fix}"``.
    """
    if not _same_grid(affine, reference):
        raise StoreError(
            f"{path}: {differs} (largest difference "
            f"{np.abs(affine - reference).max():.3g} mm); {fix}"
        )


def _mask_shape_error(
    name: str, shape: tuple[int, ...], volume_shape: tuple[int, ...]
) -> StoreError:
    """The error for a mask whose shape is not the data's volume shape."""
    return StoreError(
        f"{name}: mask shape {shape} differs from the data's volume shape "
        f"{volume_shape}; {_RESAMPLE_MASK}"
    )


def inspect_sources(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    tr: float | None = None,
) -> SourceSeries:
    """Validate a source series from its headers alone.

    Parameters
    ----------
    sources : path or sequence of paths
        One 4D NIfTI file, or an ordered list of 3D NIfTI files (a list holding one
        4D file is accepted too).
    tr : float, optional
        Repetition time in seconds; overrides the header's ``pixdim[4]``.

    Returns
    -------
    SourceSeries
        The validated description.

    Raises
    ------
    StoreError
        For a missing, unreadable or truncated file, a 3D file where a 4D one is needed,
        3D files whose shapes or affines differ, or a missing TR.

    Examples
    --------
    >>> from pathlib import Path
    >>> import nibabel
    >>> path = Path(nibabel.__file__).parent / "tests" / "data" / "functional.nii"
    >>> series = inspect_sources(path)
    >>> series.volume_shape, series.n_volumes, series.tr
    ((17, 21, 3), 20, 2.0)
    """
    paths = _as_paths(sources)
    images = [_load_header(p) for p in paths]
    files = tuple(_describe(p, img) for p, img in zip(paths, images, strict=True))
    first, first_img = paths[0], images[0]
    if len(paths) == 1 and first_img.ndim != 4:
        raise StoreError(
            f"{first}: is {first_img.ndim}D with shape {first_img.shape}, but a single source "
            "must be a 4D series; pass the 3D volumes of the run as an ordered list instead"
        )
    if len(paths) > 1:
        _check_volume_list(paths, images)
    volume_shape = tuple(int(n) for n in first_img.shape[:3])
    for source in files:
        _check_dtype(source)
        _check_uncompressed_size(source, volume_shape)
    tr_from = "argument"
    if tr is None:
        tr, tr_from = _header_tr(first, first_img), "header"
        if tr is None:
            raise StoreError(
                f"{first}: the header has no repetition time ({_tr_problem(first_img)}); "
                "pass tr=... (or --tr on the command line)"
            )
        if tr > MAX_HEADER_TR:
            raise StoreError(
                f"{first}: the header's repetition time is {tr:g} s, which is implausible "
                "(milliseconds labelled as seconds?); pass tr=... (or --tr) in seconds"
            )
    elif not (np.isfinite(tr) and tr > 0):
        raise StoreError(f"tr must be a positive number of seconds, got {tr!r}")
    return SourceSeries(
        files=files,
        volume_shape=(volume_shape[0], volume_shape[1], volume_shape[2]),
        affine=np.asarray(first_img.affine, dtype=np.float64),
        tr=float(tr),
        tr_from=tr_from,
        space_unit=first_img.header.get_xyzt_units()[0],
    )


def inspect_map(path: str | os.PathLike[str]) -> SourceSeries:
    """Validate a statistical map (a 3D NIfTI, or 4D with one volume) from its header.

    Parameters
    ----------
    path : path
        An effect or variance map (nilearn ``effect_size``, FSL ``cope``/``varcope``,
        SPM ``con_*.nii``, bigglm's maps).

    Returns
    -------
    SourceSeries
        One file of one volume; a map has no repetition time (``tr`` is NaN).

    Raises
    ------
    StoreError
        For a missing, unreadable or truncated file, a file of several volumes, or
        voxels that are not real numbers.

    Examples
    --------
    >>> from pathlib import Path
    >>> import nibabel
    >>> path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    >>> inspect_map(path).volume_shape
    (33, 41, 25)
    """
    (file,) = _as_paths(path)
    img = _load_header(file)
    source = _describe(file, img)
    if source.n_volumes != 1 or img.ndim not in (3, 4):
        raise StoreError(
            f"{file}: has shape {img.shape}, but a subject's map must be one 3D volume; "
            "give one file per subject and contrast"
        )
    _check_dtype(source)
    shape = tuple(int(n) for n in img.shape[:3])
    _check_uncompressed_size(source, shape)
    return SourceSeries(
        files=(source,),
        volume_shape=(shape[0], shape[1], shape[2]),
        affine=np.asarray(img.affine, dtype=np.float64),
        tr=float("nan"),
        tr_from="none (a map)",
        space_unit=img.header.get_xyzt_units()[0],
    )


def read_map(series: SourceSeries, *, checksum: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a map once: its float32 values in the file's (Fortran) voxel order, and its record.

    Parameters
    ----------
    series : SourceSeries
        From :func:`inspect_map`.
    checksum : bool
        Compute the file's SHA-256 from the bytes read (default).

    Returns
    -------
    values : numpy.ndarray, shape (X * Y * Z,)
    record : dict
        ``path``, ``size`` and ``sha256`` (None without ``checksum``).

    Examples
    --------
    >>> from pathlib import Path
    >>> import nibabel
    >>> path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    >>> values, record = read_map(inspect_map(path))
    >>> values.shape, record["size"]
    ((33825,), 68002)
    """
    stream = VolumeStream(series, checksum=checksum)
    (block,) = list(stream.blocks(1))
    if checksum:
        return block[0], stream.provenance[0]
    file = series.files[0]
    return block[0], {"path": str(file.path), "size": file.path.stat().st_size, "sha256": None}


def _as_paths(sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    paths = [Path(s).expanduser().resolve() for s in sources]
    if not paths:
        raise StoreError("no source files given; pass a 4D NIfTI or a list of 3D volumes")
    return paths


def _check_volume_list(paths: list[Path], images: list[nib.Nifti1Image]) -> None:
    """Every file of a 3D list must be 3D (or 4D of one volume) on the first file's grid."""
    ref_path, ref = paths[0], images[0]
    for path, img in zip(paths, images, strict=True):
        if (img.ndim == 4 and img.shape[3] != 1) or img.ndim not in (3, 4):
            raise StoreError(
                f"{path}: has shape {img.shape}, but a list of sources must hold single 3D "
                "volumes; pass a 4D series on its own instead"
            )
        if img.shape[:3] != ref.shape[:3]:
            raise StoreError(
                f"{path}: volume shape {img.shape[:3]} differs from {ref.shape[:3]} of "
                f"{ref_path}; all volumes of a run must share one grid"
            )
        _check_affine(
            path,
            img.affine,
            ref.affine,
            differs=f"affine differs from that of {ref_path}",
            fix="all volumes of a run must share one grid, resample them first",
        )


def load_mask(mask: str | os.PathLike[str] | np.ndarray, series: SourceSeries) -> np.ndarray:
    """Read a mask (a NIfTI file or a boolean array) and check it lies on the series' grid.

    Parameters
    ----------
    mask : path or numpy.ndarray
        A 3D NIfTI whose non-zero, finite voxels are in the mask; or an array of shape
        ``series.volume_shape`` (taken to be on the series' grid).
    series : SourceSeries
        The series it must match (same volume shape and, for a file, affine).

    Returns
    -------
    numpy.ndarray
        Boolean array of shape ``series.volume_shape``.

    Raises
    ------
    StoreError
        If the file is missing or unreadable, the mask is not 3D, lies on another grid,
        or is empty.

    Examples
    --------
    >>> from pathlib import Path
    >>> import tempfile, nibabel, numpy as np
    >>> src = Path(nibabel.__file__).parent / "tests" / "data" / "functional.nii"
    >>> series = inspect_sources(src)
    >>> img = nibabel.Nifti1Image(np.ones(series.volume_shape, np.uint8), series.affine)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     nibabel.save(img, Path(tmp) / "mask.nii")
    ...     int(load_mask(Path(tmp) / "mask.nii", series).sum())
    1071
    """
    if isinstance(mask, np.ndarray):
        name, data = "the mask array", mask
    else:
        path = Path(mask).expanduser().resolve()
        img = _load_header(path)
        name, data = str(path), _mask_data(path, img, series)
    if data.shape != series.volume_shape:
        raise _mask_shape_error(name, data.shape, series.volume_shape)
    selected = np.isfinite(data) & (data != 0)
    if not selected.any():
        raise StoreError(f"{name}: the mask has no non-zero voxel; check the mask")
    return np.asarray(selected)


def _mask_data(path: Path, img: nib.Nifti1Image, series: SourceSeries) -> np.ndarray:
    """A mask file's voxels (a 4D file of one volume counts as 3D), after the grid checks."""
    shape = img.shape[:3] if img.ndim == 4 and img.shape[3] == 1 else img.shape
    if tuple(shape) != series.volume_shape:
        raise _mask_shape_error(str(path), img.shape, series.volume_shape)
    _check_affine(
        path,
        img.affine,
        series.affine,
        differs="mask affine differs from the data's",
        fix=_RESAMPLE_MASK,
    )
    return np.asarray(img.dataobj).reshape(series.volume_shape)


class _Sha256:
    """A SHA-256 computed in a background thread, in the order the data are submitted.

    ``hashlib`` releases the GIL on large buffers, so hashing runs on its own core while
    the caller reads (or decompresses) the next bytes. A submitted buffer must not change
    until :meth:`wait` says it has been hashed (pass ``copy=True`` for one that will).
    """

    #: Bytes of submitted copies allowed to wait for the hasher (bounds memory).
    MAX_PENDING_COPIES = 64 * 1024 * 1024

    def __init__(self, pool: ThreadPoolExecutor | None) -> None:
        self._pool = pool
        self._sha = hashlib.sha256()
        self._copies: collections.deque[tuple[Future[None], int]] = collections.deque()
        self._copied = 0
        self.last: Future[None] | None = None

    def submit(self, data: Any, *, copy: bool = False) -> None:
        """Hash ``data`` (a bytes-like object) after everything submitted before."""
        if self._pool is None:
            return
        if copy:
            data = bytes(data)
        self.last = self._pool.submit(self._sha.update, data)
        if copy:
            self._copies.append((self.last, len(data)))
            self._copied += len(data)
            while self._copied > self.MAX_PENDING_COPIES:
                done, size = self._copies.popleft()
                done.result()
                self._copied -= size

    @staticmethod
    def wait(submitted: Future[None] | None) -> None:
        """Return once the data submitted as ``submitted`` (a :attr:`last`) are hashed."""
        if submitted is not None:
            submitted.result()

    def hexdigest(self) -> str:
        """The digest of everything submitted (waits for the hasher)."""
        self.wait(self.last)
        return self._sha.hexdigest()


class _HashingReader:
    """A read-only raw file that submits every byte it returns to a :class:`_Sha256`.

    Parameters
    ----------
    raw : file
        An unbuffered binary file.
    sha : _Sha256
        Where the bytes go.
    copy : bool
        Whether callers of :meth:`readinto` reuse their buffer before it is hashed (a
        decompressor's input buffer): then the bytes are copied for the hasher.
    """

    def __init__(self, raw: io.RawIOBase, sha: _Sha256, *, copy: bool) -> None:
        self._raw = raw
        self._copy = copy
        self.sha256 = sha
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n) or b""
        self.sha256.submit(data)
        self.size += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer) or 0
        if n:
            self.sha256.submit(memoryview(buffer).cast("B")[:n], copy=self._copy)
        self.size += n
        return n

    def drain(self) -> None:
        """Read (and hash) whatever the consumer left unread, up to the end of the file."""
        while self.read(_READ_SIZE):
            pass

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)


def _gzip_reader(fileobj: Any) -> Any:
    """A sequential gzip decompressor over ``fileobj`` (ISA-L, through its public ``IGzipFile``).

    Read in slices of :data:`_READ_SIZE`, its buffered layer passes most of each slice
    straight to the decompressor (within a few per cent of ISA-L's unbuffered C reader,
    measured on a 120 MB series).
    """
    return igzip.IGzipFile(fileobj=fileobj, mode="rb")


class VolumeStream:
    """Read a :class:`SourceSeries` once, front to back, in blocks of whole volumes.

    Iterating over :meth:`blocks` yields float32 arrays of shape ``(n, X*Y*Z)`` with the
    header scaling applied, each row one volume in the file's (Fortran) voxel order.
    When the iteration ends, :attr:`provenance` holds each file's path, size and SHA-256,
    computed from the bytes read (no second read of the file), in a background thread
    that hashes each piece of the file as soon as it is read.

    Parameters
    ----------
    series : SourceSeries
        What to read.
    checksum : bool
        Compute each file's SHA-256 (default); off for temporary files.

    Examples
    --------
    >>> from pathlib import Path
    >>> import nibabel
    >>> path = Path(nibabel.__file__).parent / "tests" / "data" / "functional.nii"
    >>> stream = VolumeStream(inspect_sources(path))
    >>> [block.shape for block in stream.blocks(8)]
    [(8, 1071), (8, 1071), (4, 1071)]
    >>> stream.provenance[0]["size"]
    43192
    """

    def __init__(self, series: SourceSeries, *, checksum: bool = True) -> None:
        self.series = series
        self.checksum = checksum
        self.provenance: list[dict[str, Any]] = []

    def blocks(self, block_volumes: int, *, recycle: int = 0) -> Iterator[np.ndarray]:
        """Yield float32 blocks of at most ``block_volumes`` volumes, in time order.

        With ``recycle=k`` (k >= 2), read buffers are reused: a block is overwritten
        when the ``k``-th block after it is read, so the consumer must be done with it
        by then (a consumer behind :func:`~bigglm.io.streaming.prefetched`, which reads
        at most two blocks ahead, is safe with ``k = 3``). Reusing buffers spares the
        page faults of fresh memory for every block. Default: every block is new.

        Consumers must not write to the blocks (the hasher may still be reading them).
        """
        if recycle == 1:
            raise ValueError("recycle must be 0 (no reuse) or at least 2")
        self.provenance = []
        pending: list[np.ndarray] = []
        n_pending = 0
        pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigglm-sha256")
            if self.checksum
            else None
        )
        try:
            for source in self.series.files:
                for part in self._file_blocks(source, block_volumes, pool, recycle):
                    if not pending and part.shape[0] == block_volumes:
                        yield part
                        continue
                    # A part kept here is either copied at once (concatenated with a full
                    # block's worth) or its file's last, whose buffers are not reused.
                    pending.append(part)
                    n_pending += part.shape[0]
                    if n_pending >= block_volumes:
                        joined = np.concatenate(pending)
                        yield joined[:block_volumes]
                        rest = joined[block_volumes:]
                        pending, n_pending = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
            if pending:
                yield np.concatenate(pending)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _file_blocks(
        self,
        source: SourceFile,
        block_volumes: int,
        pool: ThreadPoolExecutor | None,
        recycle: int,
    ) -> Iterator[np.ndarray]:
        n_voxels = self.series.voxels_per_volume
        volume_bytes = n_voxels * source.dtype.itemsize
        sha = _Sha256(pool)
        ring: list[tuple[np.ndarray, Future[None] | None]] = []
        with open(source.path, "rb", buffering=0) as raw:
            hashing = _HashingReader(raw, sha, copy=source.compressed)
            stream: Any = _gzip_reader(hashing) if source.compressed else hashing
            try:
                _read_exact(stream, memoryview(bytearray(source.offset)), source)
                for index, start in enumerate(range(0, source.n_volumes, block_volumes)):
                    n = min(block_volumes, source.n_volumes - start)
                    buffer = _ring_buffer(ring, index, recycle, n * volume_bytes)
                    _read_exact(stream, buffer.data, source)
                    if source.compressed:
                        pass  # the hasher reads copies of the compressed bytes, not the buffer
                    elif recycle:
                        ring[index % recycle] = (ring[index % recycle][0], sha.last)
                    else:
                        sha.wait(sha.last)  # a new block per read: the consumer may keep it
                    yield _scale(buffer.view(source.dtype).reshape(n, n_voxels), source)
                _finish(stream, source)
            except (EOFError, OSError, igzip.BadGzipFile) as err:
                if isinstance(err, StoreError):
                    raise
                problem = "corrupt or truncated gzip data" if source.compressed else "read error"
                raise StoreError(
                    f"{source.path}: {problem} ({err}); re-copy or re-export the file"
                ) from err
            if self.checksum:
                hashing.drain()
        self.provenance.append(
            {"path": str(source.path), "size": hashing.size, "sha256": sha.hexdigest()}
        )


def _ring_buffer(
    ring: list[tuple[np.ndarray, Future[None] | None]], index: int, recycle: int, nbytes: int
) -> np.ndarray:
    """The read buffer for block ``index``: new, or the ring's slot once hashed."""
    if not recycle:
        return np.empty(nbytes, dtype=np.uint8)
    if len(ring) < recycle:
        ring.append((np.empty(nbytes, dtype=np.uint8), None))
        return ring[-1][0]
    buffer, hashed = ring[index % recycle]
    _Sha256.wait(hashed)  # the hasher may still be reading it
    return buffer[:nbytes]


def _read_exact(stream: Any, view: memoryview, source: SourceFile) -> None:
    """Fill ``view`` from ``stream`` or raise a StoreError: the file ended early."""
    filled = 0
    total = len(view)
    while filled < total:
        n = stream.readinto(view[filled : filled + _READ_SIZE])
        if not n:
            raise StoreError(
                f"{source.path}: truncated: the data ended {total - filled} bytes early; "
                "re-copy or re-export the file"
            )
        filled += n


def _finish(stream: Any, source: SourceFile) -> None:
    """Read a gzip stream to its end so its CRC and length are verified."""
    if source.compressed:
        while stream.read(_READ_SIZE):
            pass


def _scale(raw: np.ndarray, source: SourceFile) -> np.ndarray:
    """Stored values to float32 data values, in native byte order.

    Scaling (``raw * slope + inter``) is computed in float64 and rounded once to float32,
    so the result is nibabel's ``get_fdata()`` rounded to float32, bit for bit.
    """
    if source.slope == 1.0 and source.inter == 0.0:
        return raw.astype(np.float32, copy=False)  # a view for native float32: the buffer is ours
    slope, inter = np.float64(source.slope), np.float64(source.inter)
    out = np.empty(raw.shape, dtype=np.float32)
    for volume, scaled in zip(raw, out, strict=True):  # float64 temporaries of one volume
        scaled[...] = volume * slope + inter
    return out
