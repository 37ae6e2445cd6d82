"""NIfTI series to bigglm stores: :func:`convert` for one run, :func:`convert_many` for several.

How one run is converted:

1. Validate everything the headers tell (files, shapes, affines, TR, mask grid, the
   target path) before writing anything.
2. With a mask given, stream the source once: each block of volumes is reduced to the
   in-mask voxels and gathered into rows of whole ``bold`` chunks, written as they fill.
3. With no mask, the EPI mask needs the mean volume, i.e. the whole series, before the
   first in-mask value is known: the source is then read twice, a first pass for the
   mean (and the checksums), a second as in step 2, whose checksums must match the
   first (else the file changed meanwhile: error). Two reads were preferred to spilling
   the decoded series to a temporary file during the first pass: both cost the same
   CPU, but the spill's wall time depends on disk write-back, and on a cluster it would
   put the whole uncompressed series through the shared filesystem once more (README.md,
   "Converting NIfTI to a store", has the measurement). An uncompressed source's second
   read is normally served from the page cache. Give a mask (e.g. fMRIPrep's
   ``desc-brain_mask``) for a single pass.

Voxels that are NaN or Inf at any time point are dropped from the mask, with a
:class:`~bigglm.exceptions.BigGLMWarning` giving their number. Memory is bounded by
three read blocks (about 32 MiB of decoded data each) plus two rows of ``bold`` chunks,
whatever the series length.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bigglm.exceptions import BigGLMWarning, StoreError
from bigglm.io.artefacts import check_replaceable, writing
from bigglm.io.mask import compute_epi_mask
from bigglm.io.nifti import (
    SourceSeries,
    VolumeStream,
    inspect_sources,
    load_mask,
)
from bigglm.io.store import BOLD_CODEC, StoreWriter, choose_chunks, run_attributes
from bigglm.io.streaming import prefetched, write_rows
from bigglm.typing import ProgressCallback

__all__ = ["convert", "convert_many"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Sources = PathLike | Sequence[PathLike] | Mapping[str, PathLike]
MaskLike = PathLike | np.ndarray | Mapping[str, Any]

#: Bytes of decoded float32 volumes read per block (bounds the memory of the read side).
READ_BLOCK_BYTES = 32 * 1024 * 1024

#: Read buffers reused in turn: a consumer behind :func:`prefetched` holds one block while
#: one waits in the queue and the next is read, so a third buffer is never in use.
RECYCLE = 3


@dataclass
class _FirstPass:
    """What a pass over the source learns: per-voxel sum, non-finite flags, provenance."""

    total: np.ndarray
    nonfinite: np.ndarray
    provenance: list[dict[str, Any]]


def convert(
    sources: Sources,
    store: PathLike,
    *,
    mask: MaskLike | None = None,
    tr: float | None = None,
    overwrite: bool = False,
    time_chunk: int | None = None,
    voxel_chunk: int | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Convert one run of NIfTI volumes, GIFTI or CIFTI-2 series to a bigglm store.

    Parameters
    ----------
    sources : path, sequence of paths, or mapping
        A 4D ``.nii``/``.nii.gz``, or the run's 3D volumes in time order. Integer data
        are scaled with the header's ``scl_slope``/``scl_inter``; all data are stored as
        float32. Or a run on the cortical surface (:mod:`bigglm.io.surface_conversion`):
        its GIFTI functional series, one ``*.func.gii`` per hemisphere (a list, told
        apart by ``hemi-L``/``hemi-R`` in their names, or ``{"L": left, "R": right}``),
        or one CIFTI-2 dense series ``*.dtseries.nii``.
    store : path
        The store to create (conventionally ``*.zarr``).
    mask : path, numpy.ndarray or mapping, optional
        A 3D mask NIfTI on the same grid (shape and affine), or a boolean array of the
        volume shape. Default: an EPI mask computed from the mean volume
        (:func:`bigglm.io.mask.compute_epi_mask`, as nilearn's ``compute_epi_mask``).
        For GIFTI, ``{"L": ..., "R": ...}`` (boolean arrays or GIFTI files of one value
        per vertex); default: the vertices that vary over time (no medial wall). None
        for CIFTI-2, which keeps its own grayordinates.
    tr : float, optional
        Repetition time in seconds. Default: the header's ``pixdim[4]``, converted from
        its time unit (ms and us are handled); for CIFTI-2 the series axis's step;
        GIFTI records none, so it must be given.
    overwrite : bool
        Replace an existing store (atomically: the old one is removed only once the new
        one is complete). Only a run store bigglm wrote is ever replaced: anything else
        at ``store`` (a folder, a file, a Zarr store of another tool or another kind of
        bigglm store) is refused, whatever ``overwrite`` says.
    time_chunk, voxel_chunk : int, optional
        ``bold`` chunk shape; by default 128 volumes and about 16 MiB per chunk.
    progress : callable, optional
        Called with ``(done, total)`` volumes (twice the series length when the mask is
        computed, which takes a pass to find the mean).

    Returns
    -------
    pathlib.Path
        The absolute path of the store.

    Raises
    ------
    StoreError
        Before anything is written: missing, unreadable or truncated files, a 3D file
        where a 4D one is needed, volumes on different grids, a mask on another grid, no
        TR, an existing store without ``overwrite``, anything but a bigglm run store at
        ``store``. A truncated ``.nii.gz`` is only
        discovered while it is decompressed: then the staging directory is removed and
        nothing is left at ``store``.

    Warns
    -----
    BigGLMWarning
        When voxels with NaN or Inf values are dropped from the mask.

    Examples
    --------
    nibabel's 3-slice test series is too thin for an EPI mask, so give one:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import nibabel, bigglm
    >>> src = Path(nibabel.__file__).parent / "tests" / "data" / "functional.nii"
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = bigglm.convert(src, Path(tmp) / "run.zarr", mask=np.ones((17, 21, 3), bool))
    ...     bigglm.open_run(path).bold.shape
    (20, 1071)
    """
    target = Path(store).expanduser().resolve()
    report = progress or (lambda done, total: None)
    surface = _surface_converter(sources)
    if surface is not None:
        return surface(
            sources,
            target,
            mask=mask,
            tr=tr,
            overwrite=overwrite,
            chunks=(time_chunk, voxel_chunk),
            progress=report,
        )
    series = inspect_sources(sources, tr=tr)  # type: ignore[arg-type]
    check_replaceable(target, "run-store", overwrite=overwrite)
    given_mask = load_mask(mask, series) if mask is not None else None  # type: ignore[arg-type]
    with writing(target, "run-store", overwrite=overwrite, directory=True) as stage:
        first: _FirstPass | None = None
        if given_mask is None:
            first = _mean_pass(series, report)
            chosen, done = _epi_mask(first, series), series.n_volumes
        else:
            chosen, done = given_mask, 0
        reader = VolumeStream(series)
        chunks = choose_chunks(series.n_volumes, int(chosen.sum()), time_chunk, voxel_chunk)
        logger.info(
            "converting %s: %d volumes x %d in-mask voxels, chunks %s, TR %g s",
            series.files[0].path,
            series.n_volumes,
            int(chosen.sum()),
            chunks,
            series.tr,
        )
        nonfinite = first.nonfinite if first is not None else None
        scan_globals: list[float] = []
        writer, bad = _write_pass(
            series, reader, chosen, chunks, stage, nonfinite, report, done, scan_globals
        )
        provenance = reader.provenance
        if first is not None:
            _check_unchanged(first.provenance, provenance)
        params = _parameters(series, mask, chunks, bad_voxels=bad)
        writer.finish(_attributes(series, provenance, params, scan_globals))
    return target


def _surface_converter(sources: Any) -> Any:
    """The converter of a GIFTI or CIFTI-2 run (told by the file names), or None."""
    from bigglm.io.cifti import is_cifti
    from bigglm.io.gifti import is_gifti

    if not (is_gifti(sources) or is_cifti(sources)):
        return None
    from bigglm.io import surface_conversion

    if is_cifti(sources):
        return surface_conversion.convert_cifti
    return surface_conversion.convert_gifti


def _epi_mask(first: _FirstPass, series: SourceSeries) -> np.ndarray:
    mask = compute_epi_mask(_mean_volume(first, series))
    if not mask.any():
        raise StoreError(
            f"{series.files[0].path}: the EPI mask computed from the mean volume is empty "
            "(too few slices, or not an EPI series); pass a mask"
        )
    return mask


def _mean_pass(series: SourceSeries, report: ProgressCallback) -> _FirstPass:
    """Read the source once for the per-voxel sum, non-finite flags and checksums."""
    stream = VolumeStream(series)
    total = np.zeros(series.voxels_per_volume, dtype=np.float64)
    done = 0
    with contextlib.closing(
        prefetched(stream.blocks(_read_volumes(series), recycle=RECYCLE))
    ) as blocks:
        for block in blocks:
            total += block.sum(axis=0, dtype=np.float64)
            done += block.shape[0]
            report(done, 2 * series.n_volumes)
    return _FirstPass(total, ~np.isfinite(total), stream.provenance)


def _check_unchanged(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> None:
    """Refuse to commit if a source changed between the two passes."""
    for before, after in zip(first, second, strict=True):
        if before != after:
            raise StoreError(
                f"{before['path']}: changed while it was converted (SHA-256 or size differ "
                "between the mean pass and the write pass); convert it again once nothing "
                "writes to it"
            )


def _mean_volume(first: _FirstPass, series: SourceSeries) -> np.ndarray:
    """The mean volume as an ``(X, Y, Z)`` array (stored voxel order is Fortran)."""
    mean = first.total / series.n_volumes
    return mean.reshape(series.volume_shape, order="F")


def _read_volumes(series: SourceSeries) -> int:
    """Volumes per read block: about :data:`READ_BLOCK_BYTES` of float32."""
    return max(1, READ_BLOCK_BYTES // (4 * series.voxels_per_volume))


def _flat_indices(mask: np.ndarray) -> np.ndarray:
    """Positions, in the file's Fortran voxel order, of the mask's voxels in C order."""
    return np.asarray(np.ravel_multi_index(np.nonzero(mask), mask.shape, order="F"))


def _write_pass(
    series: SourceSeries,
    reader: VolumeStream,
    mask: np.ndarray,
    chunks: tuple[int, int],
    stage: Path,
    nonfinite: np.ndarray | None,
    report: ProgressCallback,
    done: int,
    scan_globals: list[float],
) -> tuple[StoreWriter, int]:
    """Write ``bold`` for ``mask``, dropping NaN/Inf voxels; return the writer and their count.

    Each scan's SPM global (:func:`spm_globals`, over the whole volume) is appended to
    ``scan_globals`` as its block passes."""
    if nonfinite is not None:
        mask, bad = _drop_nonfinite(mask, nonfinite.reshape(series.volume_shape, order="F"))
        _warn_nonfinite(series, bad)
        _require_voxels(mask, series)
    columns = _flat_indices(mask)
    writer = StoreWriter(stage, mask, n_volumes=series.n_volumes, tr=series.tr, chunks=chunks)
    seen_bad = write_rows(
        writer.write,
        _recording_globals(reader.blocks(_read_volumes(series), recycle=RECYCLE), scan_globals),
        columns,
        chunks[0],
        check_finite=nonfinite is None,
        report=lambda n: report(done + n, series.n_volumes + done),
    )
    if nonfinite is None and seen_bad.any():
        _warn_nonfinite(series, int(seen_bad.sum()))
        keep = mask.copy()
        keep[mask] = ~seen_bad
        _require_voxels(keep, series)
        writer = _rewrite_without(stage, keep, seen_bad, series, chunks)
        return writer, int(seen_bad.sum())
    return writer, 0 if nonfinite is None else bad


def _recording_globals(blocks: Iterator[np.ndarray], out: list[float]) -> Iterator[np.ndarray]:
    """The blocks of volumes, unchanged, each scan's global appended to ``out`` first."""
    for block in blocks:
        out.extend(spm_globals(block).tolist())
        yield block


def spm_globals(volumes: np.ndarray) -> np.ndarray:
    """SPM's global value of each scan (``spm_global``): the mean of the voxels above one
    eighth of the scan's mean, over the whole volume (finite values only).

    ``bigglm.convert`` records it per scan in the store (``spm_global``) before any mask
    is applied, for SPM's grand mean scaling (``bigglm.fit(..., scaling="session")``).

    Parameters
    ----------
    volumes : numpy.ndarray, shape (scans, voxels)

    Returns
    -------
    numpy.ndarray, shape (scans,)

    Examples
    --------
    >>> spm_globals(np.array([[0.0, 0.0, 0.0, 8.0, 10.0, 12.0]]))  # mean 5: 10 of > 0.625
    array([10.])
    """
    data = np.asarray(volumes, dtype=np.float64)
    finite = np.isfinite(data)
    clean = np.where(finite, data, 0.0)
    means = clean.sum(axis=1) / np.maximum(finite.sum(axis=1), 1)
    above = finite & (data > means[:, None] / 8)
    totals = np.where(above, clean, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(totals / above.sum(axis=1), dtype=np.float64)


def _require_voxels(mask: np.ndarray, series: SourceSeries) -> None:
    if not mask.any():
        raise StoreError(
            f"{series.files[0].path}: every voxel of the mask has NaN or Inf values; "
            "check the data (or the mask)"
        )


def _drop_nonfinite(mask: np.ndarray, nonfinite: np.ndarray) -> tuple[np.ndarray, int]:
    dropped = mask & nonfinite
    return mask & ~nonfinite, int(dropped.sum())


def _warn_nonfinite(series: SourceSeries, count: int) -> None:
    if count:
        warnings.warn(
            f"{series.files[0].path}: {count} voxel(s) have NaN or Inf values in at least one "
            "volume; they are excluded from the mask",
            BigGLMWarning,
            stacklevel=4,
        )


def _rewrite_without(
    stage: Path,
    keep: np.ndarray,
    drop: np.ndarray,
    series: SourceSeries,
    chunks: tuple[int, int],
) -> StoreWriter:
    """Rebuild ``bold`` without the dropped columns (rare: non-finite voxels in a given mask)."""
    old = stage.with_name(stage.name + ".nonfinite")  # named after the staging folder,
    os.rename(stage, old)  # so a dead conversion's clean-up removes it too
    stage.mkdir()
    try:
        previous = zarr.open_array(old / "bold", mode="r")
        kept = np.flatnonzero(~drop)
        new_chunks = (chunks[0], min(chunks[1], kept.size))
        new = StoreWriter(stage, keep, n_volumes=series.n_volumes, tr=series.tr, chunks=new_chunks)
        for start in range(0, series.n_volumes, chunks[0]):
            rows = np.asarray(previous[start : start + chunks[0], :])
            new.write(start, np.ascontiguousarray(rows[:, kept]))
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return new


def _parameters(
    series: SourceSeries,
    mask: MaskLike | None,
    chunks: tuple[int, int],
    *,
    bad_voxels: int,
) -> dict[str, Any]:
    if mask is None:
        mask_name, method = None, "compute_epi_mask (bigglm.io.mask)"
    elif isinstance(mask, np.ndarray):
        mask_name, method = None, "given (array)"
    else:
        mask_name, method = str(Path(mask).expanduser().resolve()), "given (file)"  # type: ignore[arg-type]
    return {
        "mask": mask_name,
        "mask_method": method,
        "tr": series.tr,
        "tr_from": series.tr_from,
        "chunks": list(chunks),
        "codec": BOLD_CODEC.to_dict(),
        "dtype": "float32",
        "nonfinite_voxels_dropped": bad_voxels,
    }


def _attributes(
    series: SourceSeries,
    provenance: list[dict[str, Any]],
    params: dict[str, Any],
    scan_globals: list[float],
) -> dict[str, Any]:
    return run_attributes(
        affine=series.affine.tolist(),
        volume_shape=list(series.volume_shape),
        spm_global=[float(g) if np.isfinite(g) else None for g in scan_globals],
        tr=series.tr,
        units={"time": "s", "space": series.space_unit, "bold": "source units (scaled)"},
        sources=provenance,
        parameters=params,
    )


def convert_many(
    runs: Sequence[Sources],
    stores: Sequence[PathLike],
    *,
    mask: MaskLike | Sequence[MaskLike] | None = None,
    tr: float | None = None,
    overwrite: bool = False,
    time_chunk: int | None = None,
    voxel_chunk: int | None = None,
    client: Any | None = None,
    progress: ProgressCallback | None = None,
) -> list[Path]:
    """Convert several runs, in parallel across runs on a Dask client when one is given.

    Every run is validated (as in :func:`convert`) before any is converted. With a
    ``client``, each run is one task: the worker reads the source and writes the store
    itself, so sources and stores must be on a filesystem the workers share.

    Parameters
    ----------
    runs : sequence
        One entry per run, each what :func:`convert` accepts as ``sources``.
    stores : sequence of paths
        One store per run.
    mask : path, array or sequence of them, optional
        One mask for all runs, or one per run. Default: computed per run.
    tr, overwrite, time_chunk, voxel_chunk
        As in :func:`convert`, for every run.
    client : distributed.Client, optional
        Run the conversions on this client's workers. Default: one after another here.
        If a run fails on a worker, its error is raised once every run has ended; the
        runs that succeeded keep their stores.
    progress : callable, optional
        Called with ``(runs done, runs)``.

    Returns
    -------
    list of pathlib.Path
        The stores, in the order of ``runs``.

    Raises
    ------
    StoreError
        As :func:`convert`; also if ``runs``, ``stores`` (and a mask list) differ in length
        or two runs share a store.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import nibabel
    >>> src = Path(nibabel.__file__).parent / "tests" / "data" / "functional.nii"
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     stores = [Path(tmp) / "a.zarr", Path(tmp) / "b.zarr"]
    ...     paths = convert_many([src, src], stores, mask=np.ones((17, 21, 3), bool))
    ...     [p.name for p in paths]
    ['a.zarr', 'b.zarr']
    """
    masks = _per_run_masks(mask, len(runs))
    _check_runs(runs, stores, masks, tr=tr, overwrite=overwrite)
    options = {
        "tr": tr,
        "overwrite": overwrite,
        "time_chunk": time_chunk,
        "voxel_chunk": voxel_chunk,
    }
    report = progress or (lambda done, total: None)
    if client is None:
        paths = []
        for n, (src, dst, m) in enumerate(zip(runs, stores, masks, strict=True)):
            paths.append(convert(src, dst, mask=m, **options))  # type: ignore[arg-type]
            report(n + 1, len(runs))
        return paths
    return _convert_on_client(client, runs, stores, masks, options, report)


def _per_run_masks(mask: Any, n: int) -> list[MaskLike | None]:
    if mask is None or isinstance(mask, str | os.PathLike | np.ndarray | Mapping):
        return [mask] * n
    masks: list[MaskLike | None] = list(mask)
    if len(masks) != n:
        raise StoreError(f"got {len(masks)} masks for {n} runs; give one mask, or one per run")
    return masks


def _check_runs(
    runs: Sequence[Sources],
    stores: Sequence[PathLike],
    masks: list[MaskLike | None],
    *,
    tr: float | None,
    overwrite: bool,
) -> None:
    """Validate every run before converting any."""
    if len(runs) != len(stores):
        raise StoreError(f"got {len(runs)} runs but {len(stores)} stores; give one store per run")
    targets = [Path(s).expanduser().resolve() for s in stores]
    if len(set(targets)) != len(targets):
        raise StoreError("two runs would write the same store; give each run its own store path")
    for src, target, m in zip(runs, targets, masks, strict=True):
        check_replaceable(target, "run-store", overwrite=overwrite)
        if _surface_converter(src) is not None:
            continue  # read whole when converted: checked then, before anything is written
        series = inspect_sources(src, tr=tr)  # type: ignore[arg-type]
        if m is not None:
            load_mask(m, series)  # type: ignore[arg-type]


def _convert_on_client(
    client: Any,
    runs: Sequence[Sources],
    stores: Sequence[PathLike],
    masks: list[MaskLike | None],
    options: dict[str, Any],
    report: ProgressCallback,
) -> list[Path]:
    from distributed import as_completed

    futures = [
        client.submit(convert, src, dst, mask=m, pure=False, **options)
        for src, dst, m in zip(runs, stores, masks, strict=True)
    ]
    for done, _ in enumerate(as_completed(futures, loop=client.loop), start=1):
        report(done, len(futures))
    return [Path(path) for path in client.gather(futures)]
