"""GIFTI and CIFTI-2 series to bigglm stores (what :func:`bigglm.convert` does with them).

- GIFTI: the functional series of one run, one file per hemisphere (a list of paths, or
  ``{"L": left, "R": right}``; one hemisphere alone is allowed), become one store of
  geometry ``"vertex"``: the left hemisphere's kept vertices, then the right's. Kept are
  the vertices whose values change over time (the medial wall, constant in fMRIPrep's
  outputs, is left out), or those of a given mask (``{"L": ..., "R": ...}``, boolean
  arrays or GIFTI files); vertices with NaN or Inf values are dropped with a
  :class:`~bigglm.exceptions.BigGLMWarning`, as voxels are.
- CIFTI-2: a dense series becomes one store of geometry ``"grayordinate"``, every
  grayordinate in the file's order, its brain models recorded so that maps go back to a
  valid CIFTI-2 file (:func:`bigglm.to_cifti`). A grayordinate with NaN or Inf values is
  an error (CIFTI's own set of grayordinates is kept whole).

The store layout is :mod:`bigglm.io.store`'s; it is built in a staging folder and moved
into place when complete (:func:`bigglm.io.artefacts.writing`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigglm.exceptions import BigGLMWarning, StoreError
from bigglm.io.artefacts import check_replaceable, writing
from bigglm.io.cifti import DenseSeries, brain_model_columns, inspect_dtseries
from bigglm.io.geometry import HEMISPHERES
from bigglm.io.gifti import HemisphereSeries, read_hemispheres, surface_mask
from bigglm.io.store import BOLD_CODEC, StoreWriter, choose_chunks, run_attributes
from bigglm.io.streaming import write_rows
from bigglm.typing import ProgressCallback

__all__ = ["convert_cifti", "convert_gifti"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

_UNITS = {"time": "s", "bold": "source units"}


def convert_gifti(
    sources: Any,
    target: Path,
    *,
    mask: Mapping[str, Any] | None,
    tr: float | None,
    overwrite: bool,
    chunks: tuple[int | None, int | None],
    progress: ProgressCallback,
) -> Path:
    """Convert one run's GIFTI series (one file per hemisphere) to a ``vertex`` store.

    Everything is checked (files, hemispheres of one run, TR, mask, target) before the
    staging folder is made.

    Parameters
    ----------
    sources : path, sequence of paths, or mapping
        The hemispheres' ``*.func.gii`` (:func:`bigglm.io.gifti.hemisphere_paths`).
    target : pathlib.Path
        The store to create (absolute).
    mask : mapping, optional
        ``{"L": ..., "R": ...}`` (:func:`bigglm.io.gifti.surface_mask`).
    tr : float
        Repetition time in seconds; required (GIFTI records none bigglm trusts).
    overwrite : bool
        As :func:`bigglm.convert`.
    chunks : tuple
        Requested ``(time_chunk, voxel_chunk)``, each None for the default.
    progress : callable
        Called with ``(volumes written, volumes)``.

    Returns
    -------
    pathlib.Path
        ``target``.

    Raises
    ------
    StoreError
        For the bad inputs of :func:`bigglm.io.gifti.read_hemispheres`, no ``tr``, a mask
        that is not per hemisphere or on another mesh, no vertex left, or a target that
        may not be written.
    """
    check_replaceable(target, "run-store", overwrite=overwrite)
    series = read_hemispheres(sources)
    run_tr = _gifti_tr(series, tr)
    keep = _kept_vertices(series, mask)
    n_volumes = series[0].n_volumes
    n_columns = int(sum(k.sum() for k in keep.values()))
    shape = choose_chunks(n_volumes, n_columns, *chunks)
    logger.info(
        "converting %s: %d volumes x %d vertices (%s), chunks %s, TR %g s",
        series[0].path,
        n_volumes,
        n_columns,
        "+".join(s.hemisphere for s in series),
        shape,
        run_tr,
    )
    with writing(target, "run-store", overwrite=overwrite, directory=True) as stage:
        writer = StoreWriter(
            stage, _vertex_columns(keep), n_volumes=n_volumes, tr=run_tr, chunks=shape
        )
        _write_vertices(writer, series, keep, shape[0], progress)
        params = _gifti_parameters(series, mask, keep, run_tr, tr, shape)
        writer.finish(
            run_attributes(
                geometry="vertex",
                hemispheres={s.hemisphere: s.n_vertices for s in series},
                tr=run_tr,
                units=_UNITS,
                sources=[s.provenance for s in series],
                parameters=params,
            )
        )
    return target


def _write_vertices(
    writer: StoreWriter,
    series: list[HemisphereSeries],
    keep: dict[str, np.ndarray],
    rows_per_chunk: int,
    progress: ProgressCallback,
) -> None:
    """Write ``bold`` row of chunks by row of chunks: the kept vertices, left then right."""
    n_volumes = series[0].n_volumes
    for start in range(0, n_volumes, rows_per_chunk):
        rows = [s.data[start : start + rows_per_chunk, keep[s.hemisphere]] for s in series]
        writer.write(start, np.ascontiguousarray(np.concatenate(rows, axis=1)))
        progress(min(start + rows_per_chunk, n_volumes), n_volumes)


def _gifti_tr(series: list[HemisphereSeries], tr: float | None) -> float:
    if tr is None:
        raise StoreError(
            f"{series[0].path}: a GIFTI series records no repetition time bigglm can "
            "trust; pass tr= in seconds (RepetitionTime of the BIDS JSON sidecar)"
        )
    if not (np.isfinite(tr) and tr > 0):
        raise StoreError(f"tr={tr!r}; give a positive repetition time in seconds")
    return float(tr)


def _kept_vertices(
    series: list[HemisphereSeries], mask: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
    """The mask's (or the varying) vertices with finite values; warn about the others."""
    if mask is not None and not isinstance(mask, Mapping):
        raise StoreError(
            f"mask is a {type(mask).__name__}; for a GIFTI series give one mask per "
            "hemisphere, {'L': ..., 'R': ...} (boolean arrays or GIFTI files)"
        )
    keep = surface_mask(mask, series)
    dropped = 0
    for s in series:
        finite = np.isfinite(s.data).all(axis=0)
        dropped += int((keep[s.hemisphere] & ~finite).sum())
        keep[s.hemisphere] &= finite
    if dropped:
        warnings.warn(
            f"{series[0].path}: {dropped} vertices have NaN or Inf values in at least one "
            "time point; they are left out of the store",
            BigGLMWarning,
            stacklevel=4,
        )
    if not any(k.any() for k in keep.values()):
        raise StoreError(
            f"{series[0].path}: no vertex to keep (every vertex constant over time, outside "
            "the mask, or NaN); check the data or the mask"
        )
    return keep


def _vertex_columns(keep: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    hemis = [np.full(int(k.sum()), HEMISPHERES.index(h), np.int8) for h, k in keep.items()]
    vertices = [np.flatnonzero(k).astype(np.int32) for k in keep.values()]
    return {"hemisphere": np.concatenate(hemis), "vertex": np.concatenate(vertices)}


def _gifti_parameters(
    series: list[HemisphereSeries],
    mask: Mapping[str, Any] | None,
    keep: dict[str, np.ndarray],
    run_tr: float,
    tr: float | None,
    chunks: tuple[int, int],
) -> dict[str, Any]:
    masks = None if mask is None else {h: _mask_name(m) for h, m in mask.items()}
    return {
        "mask": masks,
        "mask_method": "vertices varying over time" if mask is None else "given",
        "vertices_left_out": {s.hemisphere: int((~keep[s.hemisphere]).sum()) for s in series},
        "tr": run_tr,
        "tr_from": "given" if tr is not None else None,
        "chunks": list(chunks),
        "codec": BOLD_CODEC.to_dict(),
        "dtype": "float32",
    }


def _mask_name(mask: Any) -> str | None:
    if isinstance(mask, str | os.PathLike):
        return str(Path(mask).expanduser().resolve())
    return None


def convert_cifti(
    source: PathLike | Sequence[PathLike],
    target: Path,
    *,
    mask: Any,
    tr: float | None,
    overwrite: bool,
    chunks: tuple[int | None, int | None],
    progress: ProgressCallback,
) -> Path:
    """Convert a CIFTI-2 dense series to a ``grayordinate`` store, streamed by time blocks.

    Parameters
    ----------
    source : path, or a list holding one
        A ``*.dtseries.nii`` (:func:`bigglm.io.cifti.is_cifti`).
    target, overwrite, chunks, progress
        As for :func:`convert_gifti`.
    mask : None
        CIFTI-2 keeps its own grayordinates: a mask is refused.
    tr : float, optional
        Default: the series axis's step.

    Returns
    -------
    pathlib.Path
        ``target``.

    Raises
    ------
    StoreError
        A mask given, the bad inputs of :func:`bigglm.io.cifti.inspect_dtseries`, a
        grayordinate with NaN or Inf values (then nothing is left at ``target``), or a
        target that may not be written.
    """
    if not isinstance(source, str | os.PathLike):
        (source,) = source
    if mask is not None:
        raise StoreError(
            f"{source}: a CIFTI-2 series brings its own grayordinates (its brain models); "
            "convert it without a mask"
        )
    check_replaceable(target, "run-store", overwrite=overwrite)
    series = inspect_dtseries(source, tr=tr)
    columns, cifti = brain_model_columns(series.models)
    shape = choose_chunks(series.n_volumes, series.n_grayordinates, *chunks)
    logger.info(
        "converting %s: %d volumes x %d grayordinates, chunks %s, TR %g s",
        series.path,
        series.n_volumes,
        series.n_grayordinates,
        shape,
        series.tr,
    )
    with writing(target, "run-store", overwrite=overwrite, directory=True) as stage:
        writer = StoreWriter(stage, columns, n_volumes=series.n_volumes, tr=series.tr, chunks=shape)
        bad = write_rows(
            writer.write,
            series.blocks(),
            np.arange(series.n_grayordinates),
            shape[0],
            check_finite=True,
            report=lambda n: progress(n, series.n_volumes),
        )
        _require_finite(series, bad)
        writer.finish(
            run_attributes(
                geometry="grayordinate",
                cifti={**cifti, "series": _series_attrs(series)},
                tr=series.tr,
                units=_UNITS,
                sources=[series.provenance()],
                parameters=_cifti_parameters(series, shape),
            )
        )
    return target


def _require_finite(series: DenseSeries, bad: np.ndarray) -> None:
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise StoreError(
            f"{series.path}: {int(bad.sum())} grayordinates have NaN or Inf values (the "
            f"first is column {first}, {series.models.name[first]}); bigglm keeps CIFTI's "
            "grayordinates whole: fix the data (e.g. replace them by 0) and convert again"
        )


def _series_attrs(series: DenseSeries) -> dict[str, Any]:
    axis = series.series
    return {"start": float(axis.start), "step": float(axis.step), "unit": str(axis.unit)}


def _cifti_parameters(series: DenseSeries, chunks: tuple[int, int]) -> dict[str, Any]:
    return {
        "mask": None,
        "mask_method": "CIFTI-2 brain models (every grayordinate)",
        "tr": series.tr,
        "tr_from": series.tr_from,
        "chunks": list(chunks),
        "codec": BOLD_CODEC.to_dict(),
        "dtype": "float32",
    }
