"""Collecting per-subject maps into one group store, and opening it.

The group store is a sibling of the run store (:mod:`bigglm.io.store`): a Zarr v3 group,

- ``effect``: float32 ``(S, V)``, dimension names ``("subject", "voxel")``, chunked in
  both dimensions (:data:`DEFAULT_CHUNKS`), checksummed, NaN where a subject's map does
  not cover a voxel;
- ``variance``: the same, when first-level variances were given (mixed effects need
  them); NaN wherever ``effect`` is NaN and the other way round;
- ``mask(x, y, z)``, ``i``, ``j``, ``k``: the analysis voxels, as in a run store;
- ``n_subjects(voxel)``: int32, how many subjects cover each voxel;
- attributes ``"bigglm"`` (affine, volume_shape, subjects, sources with SHA-256,
  parameters, version, created) and ``"complete": true``, written last.

What a subject does not cover (``missing``):

- ``"nan-or-zero"`` (default): NaN, or an exact 0 in the effect map. FSL (``cope``,
  ``varcope``), nilearn (``effect_size``, ``effect_variance``) and AFNI write 0 outside
  their analysis masks, SPM (``con_*.nii``) and bigglm write NaN; an effect of exactly
  0.0 inside a brain is, for real-valued estimates, an outside-the-mask voxel. A variance
  of 0 where the effect is not 0 is kept (a subject with no within-subject variance).
- ``"nan"``: only NaN; for maps where 0 is a value.

A subject is missing at a voxel if its effect or its variance is missing there; it is
missing at that voxel only: the voxel stays in the analysis for the other subjects.

The analysis mask is ``mask`` if given, else the union of the subjects' coverage, found
by a first read of the effect maps (headers and values; no SHA-256); the maps are then
read once more to be written. With a mask there is one read. Either way every subject
block is read by one task (parallel over subject blocks on a client), holding its block
of subjects by all voxels (``chunks[0] x V`` float32 per map kind), whatever the number
of subjects.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from bigglm.exceptions import DesignError, StoreError
from bigglm.io.nifti import AFFINE_TOLERANCE, SourceSeries, inspect_map, load_mask, read_map
from bigglm.typing import MissingRule, ProgressCallback

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["DEFAULT_CHUNKS", "collect", "open_group"]

logger = logging.getLogger(__name__)

#: Chunk shape ``(subject, voxel)`` of ``effect`` and ``variance``: 4 MiB of float32, and
#: 8,192 voxels by all of 10,000 subjects (what a mixed-effects block holds) is 330 MB.
DEFAULT_CHUNKS = (128, 8192)

_REQUIRED = ("effect", "mask", "i", "j", "k", "n_subjects")
_OPTIONAL = ("variance",)
_MISSING_RULES: tuple[MissingRule, ...] = ("nan", "nan-or-zero")
_ENTITY = re.compile(r"(?:^|[_/])((?:sub|ses)-[A-Za-z0-9]+)")
_REDO = "collect the maps again with overwrite=True"

MapPaths = Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]]


@dataclass(frozen=True)
class _Map:
    """One map of a subject: a NIfTI file, or one statistic of a GLM result's contrast.

    ``grid`` describes the voxel grid (for a NIfTI, the file itself, validated from its
    header; for a result, the grid of the run store it was fitted from).
    """

    path: Path
    grid: SourceSeries
    contrast: str | None = None
    stat: str = "effect"

    def read(self, *, checksum: bool) -> tuple[np.ndarray, dict[str, Any]]:
        """The map's float32 values over the whole grid (Fortran order), and its record."""
        if self.contrast is None:
            return read_map(self.grid, checksum=checksum)
        ((values, record),) = _result_maps(
            self.path, self.contrast, (self.stat,), self.grid, checksum=checksum
        )
        return values, record

    def shares_contrast(self, other: _Map | None) -> bool:
        """Whether ``other`` is another statistic of this map's GLM result contrast."""
        return (
            other is not None
            and self.contrast is not None
            and (other.path, other.contrast) == (self.path, self.contrast)
        )


@dataclass(frozen=True)
class _Subject:
    """One subject's maps, validated from their headers."""

    label: str
    effect: _Map
    variance: _Map | None


def collect(
    effects: MapPaths,
    store: str | os.PathLike[str],
    *,
    variances: MapPaths | None = None,
    mask: str | os.PathLike[str] | np.ndarray | None = None,
    subjects: Sequence[str] | None = None,
    missing: MissingRule = "nan-or-zero",
    chunks: tuple[int, int] | None = None,
    contrast: str | None = None,
    overwrite: bool = False,
    client: Client | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Collect per-subject effect (and variance) maps into one group store.

    Parameters
    ----------
    effects : sequence of paths, or dict subject -> path
        One 3D NIfTI effect map per subject (bigglm's ``stat-effect`` maps, nilearn's
        ``effect_size``, FSL's ``cope``, SPM's ``con_*.nii``), all on one grid; or
        bigglm GLM result stores (:meth:`bigglm.GLMResult.to_zarr`) with ``contrast``.
    store : path
        The group store to write (a ``.zarr`` folder).
    variances : sequence of paths, or dict subject -> path, optional
        The matching variance maps (bigglm's ``stat-variance``, nilearn's
        ``effect_variance``, FSL's ``varcope``), in the order of ``effects`` or with the
        same subjects. Needed for mixed effects.
    mask : path or boolean array, optional
        The analysis voxels. Default: every voxel some subject covers.
    subjects : sequence of str, optional
        Subject labels, one per map. Default: the dict's keys, or the BIDS ``sub-`` (and
        ``ses-``) entities of each path (file name first, then its folders).
    missing : {"nan-or-zero", "nan"}
        What marks a voxel a map does not cover (see the module docstring).
    chunks : tuple of int, optional
        ``(subjects, voxels)`` per chunk; default :data:`DEFAULT_CHUNKS`.
    contrast : str, optional
        For GLM result stores: the contrast (an expression over the result's design
        columns) whose effect and variance are collected, on the grid of the run store
        each result was fitted from.
    overwrite : bool
        Replace a group store bigglm wrote; anything else at ``store`` is refused.
    client : distributed.Client, optional
        Where the subject blocks are read (default: Dask's default scheduler).
    progress : callable, optional
        Called with ``(done, total)`` subject blocks.

    Returns
    -------
    pathlib.Path
        The store, written atomically (nothing is at ``store`` until it is complete).

    Raises
    ------
    DesignError
        For lists of different lengths, missing or duplicate subject labels, subjects
        whose labels cannot be found in their paths.
    StoreError
        Naming the file: unreadable, not one volume, on another grid than the first map
        (or the mask), negative variances; or for a ``store`` path that may not be
        written.

    Examples
    --------
    >>> import tempfile, nibabel as nib
    >>> tmp = Path(tempfile.mkdtemp())
    >>> for s, value in (("01", 1.0), ("02", 2.0)):
    ...     data = np.full((2, 2, 1), value, np.float32); data[0, 0, 0] = np.nan
    ...     nib.save(nib.Nifti1Image(data, np.eye(4)), tmp / f"sub-{s}_effect.nii.gz")
    >>> path = collect(sorted(tmp.glob("sub-*_effect.nii.gz")), tmp / "group.zarr")
    >>> ds = open_group(path)
    >>> ds.subject.values.tolist(), ds.effect.shape, ds.n_subjects.values.tolist()
    (['sub-01', 'sub-02'], (2, 3), [2, 2, 2])
    """
    from bigglm.io.artefacts import check_replaceable, writing

    if missing not in _MISSING_RULES:
        raise DesignError(f"missing={missing!r}; expected one of {_MISSING_RULES}")
    entries = _entries(effects, variances, subjects, contrast)
    first = _check_grid(entries)
    chunk_shape = _chunk_shape(chunks, len(entries))
    target = Path(store).expanduser().resolve()
    check_replaceable(target, "group-store", overwrite=overwrite)  # before any map is read
    voxels = _analysis_mask(mask, first, entries, chunk_shape[0], missing, client, progress)
    with writing(target, "group-store", overwrite=overwrite, directory=True) as stage:
        records = _write(stage, entries, voxels, chunk_shape, missing, client, progress)
        parameters = {
            "missing": missing,
            "mask": "union of the subjects' coverage" if mask is None else _mask_name(mask),
            "chunks": list(chunk_shape),
            "dtype": "float32",
        }
        _finish(stage, entries, first, records, parameters)
    logger.info("collected %d subjects, %d voxels into %s", len(entries), voxels.sum(), target)
    return target


# --- inputs ----------------------------------------------------------------------


def _entries(
    effects: MapPaths,
    variances: MapPaths | None,
    subjects: Sequence[str] | None,
    contrast: str | None = None,
) -> list[_Subject]:
    """The subjects, each with its validated maps (headers only)."""
    labels, effect_paths = _labelled(effects, subjects, "effects")
    variance_paths: list[Any] = [None] * len(labels)
    if variances is not None:
        if isinstance(variances, Mapping):
            absent = [s for s in labels if s not in variances]
            extra = [s for s in variances if s not in set(labels)]
            if absent or extra:
                raise DesignError(
                    "effects and variances name different subjects: "
                    + "; ".join(
                        f"{what}: {', '.join(map(str, names[:5]))}"
                        for what, names in (("no variance map", absent), ("no effect map", extra))
                        if names
                    )
                )
            variance_paths = [variances[s] for s in labels]
        else:
            variance_paths = list(variances)
            if len(variance_paths) != len(labels):
                raise DesignError(
                    f"got {len(labels)} effect maps but {len(variance_paths)} variance maps; "
                    "give one variance map per effect map, in the same order"
                )
    entries = [
        _subject(label, e, v, contrast)
        for label, e, v in zip(labels, effect_paths, variance_paths, strict=True)
    ]
    if any((e.variance is None) != (entries[0].variance is None) for e in entries):
        raise DesignError("some subjects have a variance map and some do not; give all or none")
    return entries


def _subject(label: str, effect: Any, variance: Any, contrast: str | None) -> _Subject:
    """A subject's maps from NIfTI paths, or from a GLM result store and a contrast."""
    from bigglm.io.artefacts import kind_of

    path = Path(effect).expanduser().resolve()
    if not (path.is_dir() and kind_of(path) == "glm-result"):
        return _Subject(label, _nifti(path), None if variance is None else _nifti(variance))
    if contrast is None:
        raise DesignError(
            f"{path}: is a bigglm GLM result; pass contrast='...' to collect that "
            "contrast's effect and variance from it"
        )
    if variance is not None:
        raise DesignError(
            f"{path}: a GLM result gives the variances of its contrast; do not pass variances"
        )
    grid = _result_grid(path)
    return _Subject(label, _Map(path, grid, contrast), _Map(path, grid, contrast, "variance"))


def _nifti(path: str | os.PathLike[str]) -> _Map:
    grid = inspect_map(path)
    return _Map(grid.files[0].path, grid)


def _result_grid(path: Path) -> SourceSeries:
    """The voxel grid of a GLM result store: that of the run store it was fitted from."""
    from bigglm.glm.persistence import read_result_store
    from bigglm.io.store import open_run

    run = read_result_store(path)[0]
    store = run.attrs.get("store")
    try:
        ds = open_run(store)
    except (StoreError, TypeError) as err:
        raise StoreError(
            f"{path}: the run store it was fitted from ({store}) cannot be opened ({err}); "
            "collect the NIfTI maps its to_nifti wrote instead"
        ) from err
    mask = np.asarray(ds["mask"].values, dtype=bool)
    return SourceSeries(
        files=(),
        volume_shape=(mask.shape[0], mask.shape[1], mask.shape[2]),
        affine=np.asarray(ds.attrs["affine"], dtype=np.float64),
        tr=float("nan"),
        tr_from="none (a map)",
    )


def _result_maps(
    path: Path, contrast: str, stats: Sequence[str], grid: SourceSeries, *, checksum: bool
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Statistics of one contrast of a result (computed once), each scattered onto its
    run's grid, with its record."""
    from bigglm.glm.result import GLMResult
    from bigglm.io.store import open_run

    result = GLMResult.from_zarr(path)
    out = result.contrast(contrast)
    mask = np.asarray(open_run(result.runs[0].attrs["store"])["mask"].values, dtype=bool)
    where = np.ravel_multi_index(np.nonzero(mask), mask.shape, order="F")
    digest = _folder_sha256(path) if checksum else None
    maps = []
    for stat in stats:
        volume = np.full(grid.voxels_per_volume, np.nan, dtype=np.float32)
        volume[where] = out[stat].values
        record: dict[str, Any] = {"path": str(path), "contrast": contrast, "statistic": stat}
        if digest is not None:
            record["sha256"] = digest
        maps.append((volume, record))
    return maps


def _folder_sha256(folder: Path) -> str:
    """SHA-256 over a store's files (relative names and bytes, in sorted order)."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _labelled(
    maps: MapPaths, subjects: Sequence[str] | None, what: str
) -> tuple[list[str], list[Any]]:
    """Subject labels and paths, labels checked to be unique and non-empty."""
    if isinstance(maps, str | os.PathLike):
        raise DesignError(f"{what} must be a list of map files (one per subject), not one path")
    if isinstance(maps, Mapping):
        labels, paths = [str(k) for k in maps], list(maps.values())
    else:
        paths = list(maps)
        labels = list(subjects) if subjects is not None else [_label_of(p) for p in paths]
    if subjects is not None and isinstance(maps, Mapping):
        raise DesignError(f"{what} is a dict: its keys are the subjects; do not pass subjects=")
    if not paths:
        raise DesignError(f"no {what} given; pass one map per subject")
    if len(labels) != len(paths):
        raise DesignError(
            f"got {len(labels)} subjects but {len(paths)} {what}; give one label per map"
        )
    _check_unique(labels, paths)
    return [str(label) for label in labels], paths


def _label_of(path: str | os.PathLike[str]) -> str:
    """The BIDS ``sub-`` (and ``ses-``) entities of a path, nearest the file name first.

    ``sub-01_task-x_stat-effect.nii.gz`` is ``sub-01``; ``sub-01/ses-2/effect_size.nii.gz``
    (nilearn's per-subject folders) is ``sub-01_ses-2``.
    """
    full = Path(path)
    found: dict[str, str] = {}
    for part in (full.name, *(p.name for p in full.parents)):
        for entity in _ENTITY.findall(part):
            found.setdefault(entity.split("-")[0], entity)
        if "sub" in found:
            return "_".join(found[key] for key in ("sub", "ses") if key in found)
    raise DesignError(
        f"{path}: no BIDS subject entity (sub-<label>) in its name or folders; pass "
        "subjects=[...] (one label per map) or a dict {subject: path}"
    )


def _check_unique(labels: Sequence[Any], paths: Sequence[Any]) -> None:
    seen: dict[str, Any] = {}
    for label, path in zip(labels, paths, strict=True):
        if not str(label).strip():
            raise DesignError(f"{path}: empty subject label; every map needs a label")
        if str(label) in seen:
            raise DesignError(
                f"subject {label!r} appears twice ({seen[str(label)]} and {path}); each "
                "subject has one map per store (for several maps per subject, e.g. paired "
                "designs, give labels such as 'sub-01_ses-pre' with subjects=[...])"
            )
        seen[str(label)] = path


def _check_grid(entries: Sequence[_Subject]) -> SourceSeries:
    """Every map on the grid of the first; the first's grid."""
    first = entries[0].effect
    for entry in entries:
        for item in (entry.effect, entry.variance):
            if item is None:
                continue
            grid = item.grid
            if grid.volume_shape != first.grid.volume_shape:
                raise StoreError(
                    f"{item.path}: shape {grid.volume_shape} differs from {first.path} "
                    f"{first.grid.volume_shape}; resample every map to one grid first"
                )
            difference = float(np.abs(grid.affine - first.grid.affine).max())
            if difference > AFFINE_TOLERANCE:
                raise StoreError(
                    f"{item.path}: affine differs from that of {first.path} (largest "
                    f"difference {difference:.3g} mm); resample every map to one grid first"
                )
    return first.grid


def _chunk_shape(chunks: tuple[int, int] | None, n_subjects: int) -> tuple[int, int]:
    subject_chunk, voxel_chunk = chunks if chunks is not None else DEFAULT_CHUNKS
    if subject_chunk < 1 or voxel_chunk < 1:
        raise DesignError(f"chunks must be two positive integers, got {chunks}")
    return min(subject_chunk, n_subjects), voxel_chunk


# --- reading maps ----------------------------------------------------------------


def _subject_values(
    entry: _Subject, columns: np.ndarray | None, missing: MissingRule, *, checksum: bool
) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]]]:
    """A subject's effect (and variance) at ``columns`` (all voxels if None), NaN where missing."""
    maps = _read_maps(entry, checksum=checksum)
    effect, records = maps[0][0], [record for _, record in maps]
    effect = effect if columns is None else effect[columns]
    absent = ~np.isfinite(effect)
    if missing == "nan-or-zero":
        absent |= effect == 0
    variance = None
    if entry.variance is not None:
        variance = maps[1][0]
        variance = variance if columns is None else variance[columns]
        absent |= ~np.isfinite(variance)
        _check_variance(variance, absent, entry)
        variance = np.where(absent, np.float32(np.nan), variance)
    return np.where(absent, np.float32(np.nan), effect), variance, records


def _read_maps(entry: _Subject, *, checksum: bool) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """The subject's effect (and variance) over the grid with their records; a GLM
    result's contrast is computed once for both."""
    if entry.effect.shares_contrast(entry.variance):
        assert entry.effect.contrast is not None and entry.variance is not None
        stats = (entry.effect.stat, entry.variance.stat)
        return _result_maps(
            entry.effect.path, entry.effect.contrast, stats, entry.effect.grid, checksum=checksum
        )
    maps = [entry.effect.read(checksum=checksum)]
    if entry.variance is not None:
        maps.append(entry.variance.read(checksum=checksum))
    return maps


def _check_variance(variance: np.ndarray, absent: np.ndarray, entry: _Subject) -> None:
    negative = (variance < 0) & ~absent
    if negative.any():
        assert entry.variance is not None
        raise StoreError(
            f"{entry.variance.path}: subject {entry.label!r} has negative variances "
            f"at {int(negative.sum())} voxels (smallest {float(variance[negative].min()):.3g}); "
            "a variance map holds squared standard errors (varcope, effect_variance), check "
            "that effects and variances were not swapped"
        )


def _coverage(entries: Sequence[_Subject], missing: MissingRule) -> np.ndarray:
    """How many of ``entries`` cover each voxel of the grid (Fortran order)."""
    count = np.zeros(entries[0].effect.grid.voxels_per_volume, dtype=np.int32)
    for entry in entries:
        effect, _, _ = _subject_values(
            _Subject(entry.label, entry.effect, None), None, missing, checksum=False
        )
        count += np.isfinite(effect)
    return count


def _analysis_mask(
    mask: str | os.PathLike[str] | np.ndarray | None,
    first: SourceSeries,
    entries: Sequence[_Subject],
    block: int,
    missing: MissingRule,
    client: Client | None,
    progress: ProgressCallback | None,
) -> np.ndarray:
    """The analysis voxels: the mask given, or the union of the subjects' coverage."""
    import dask

    from bigglm.glm.orchestration import compute_blocks

    if mask is not None:
        voxels = load_mask(mask, first)
    else:
        logger.info("reading %d effect maps for their union coverage", len(entries))
        tasks = [
            dask.delayed(_coverage)(entries[lo : lo + block], missing)
            for lo in range(0, len(entries), block)
        ]
        counts = np.sum(compute_blocks(tasks, client, progress), axis=0)
        voxels = np.asarray(counts > 0).reshape(first.volume_shape, order="F")
    if not voxels.any():
        raise StoreError(
            f"no voxel is covered by any of the {len(entries)} effect maps"
            + (" inside the mask" if mask is not None else "")
            + f" (first: {entries[0].effect.path}); check the maps (all NaN or 0?)"
        )
    return voxels


# --- writing ---------------------------------------------------------------------


def _write(
    stage: Path,
    entries: Sequence[_Subject],
    voxels: np.ndarray,
    chunk_shape: tuple[int, int],
    missing: MissingRule,
    client: Client | None,
    progress: ProgressCallback | None,
) -> list[dict[str, Any]]:
    """Create the arrays, then write subject block by subject block (in parallel).

    Returns the maps' provenance records, subject by subject.
    """
    import dask
    import zarr

    from bigglm.glm.orchestration import compute_blocks
    from bigglm.io.store import create_chunked, create_grid, create_small

    group = zarr.open_group(stage, mode="w-", zarr_format=3)
    shape = (len(entries), int(voxels.sum()))
    names = ["effect"] + (["variance"] if entries[0].variance is not None else [])
    for name in names:
        create_chunked(group, name, shape, chunk_shape, ("subject", "voxel"), units="map units")
    create_grid(group, voxels)
    columns = dask.delayed(np.ravel_multi_index(np.nonzero(voxels), voxels.shape, order="F"))
    block = chunk_shape[0]
    tasks = [
        dask.delayed(_write_block)(str(stage), entries[lo : lo + block], lo, columns, missing)
        for lo in range(0, len(entries), block)
    ]
    logger.info("writing %d subjects in %d blocks", len(entries), len(tasks))
    done = compute_blocks(tasks, client, progress)
    counts = np.asarray(np.sum([n for n, _ in done], axis=0), dtype=np.int32)
    create_small(group, "n_subjects", counts, ("voxel",))
    return [record for _, records in done for record in records]


def _write_block(
    stage: str, entries: Sequence[_Subject], start: int, columns: np.ndarray, missing: MissingRule
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Read a block of subjects' maps and write their rows of chunks; per-voxel counts."""
    import zarr

    from bigglm.io.store import ChunkRowWriter

    values = [_subject_values(e, columns, missing, checksum=True) for e in entries]
    group = zarr.open_group(stage, mode="r+")
    effect = np.stack([v[0] for v in values])
    blocks = {"effect": effect}
    variances = [v[1] for v in values if v[1] is not None]
    if variances:
        blocks["variance"] = np.stack(variances)
    for name, block in blocks.items():  # every chunk written, all-NaN ones too
        ChunkRowWriter(_array_of(group, name), Path(stage) / name).write(start, block)
    records = [
        {"subject": e.label, **dict(zip(("effect", "variance"), v[2], strict=False))}
        for e, v in zip(entries, values, strict=True)
    ]
    return np.isfinite(effect).sum(axis=0, dtype=np.int32), records


def _array_of(group: Any, name: str) -> Any:
    """An array of the staging group (typed loosely: zarr's Group indexing is str-only)."""
    return group[name]


def _mask_name(mask: str | os.PathLike[str] | np.ndarray) -> str:
    if isinstance(mask, np.ndarray):
        return "given (array)"
    return str(Path(mask).expanduser().resolve())


def _finish(
    stage: Path,
    entries: Sequence[_Subject],
    first: SourceSeries,
    records: list[dict[str, Any]],
    parameters: dict[str, Any],
) -> None:
    """The store's attributes, then its completion flag (last)."""
    import zarr

    from bigglm import __version__

    group = zarr.open_group(stage, mode="r+")
    group.attrs["bigglm"] = {
        "kind": "group",
        "affine": first.affine.tolist(),
        "volume_shape": list(first.volume_shape),
        "subjects": [e.label for e in entries],
        "sources": records,
        "parameters": parameters,
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    group.attrs["complete"] = True


# --- reading the store -----------------------------------------------------------


def open_group(store: str | os.PathLike[str] | Any) -> xr.Dataset:
    """Open a group store lazily as an xarray Dataset.

    No map data are read: ``effect`` and ``variance`` are dask arrays over the store's
    chunks, read (and their checksums verified) by the workers when a graph runs.

    Parameters
    ----------
    store : path or zarr store
        A store written by :func:`collect`.

    Returns
    -------
    xarray.Dataset
        ``effect(subject, voxel)``, ``variance(subject, voxel)`` if collected, ``mask(x,
        y, z)``, ``n_subjects(voxel)``; coordinates ``subject`` (labels), ``voxel``,
        ``i``, ``j``, ``k``; attrs ``affine``, ``volume_shape``, ``subjects``,
        ``sources``, ``parameters``, ``version``, ``store`` and ``tr`` (None: maps have
        no time axis).

    Raises
    ------
    StoreError
        If the path is not a group store, is incomplete, or lacks a chunk file.

    Examples
    --------
    >>> import tempfile, nibabel as nib
    >>> tmp = Path(tempfile.mkdtemp())
    >>> paths = []
    >>> for s in ("01", "02", "03"):
    ...     paths.append(tmp / f"sub-{s}.nii")
    ...     nib.save(nib.Nifti1Image(np.ones((2, 1, 1), np.float32), np.eye(4)), paths[-1])
    >>> ds = open_group(collect(paths, tmp / "g.zarr"))
    >>> ds.effect.dims, ds.sizes["subject"], "variance" in ds
    (('subject', 'voxel'), 3, False)
    """
    from bigglm.io.store import lazy_array, open_layout, read_small

    group, name, arrays = open_layout(store, _REQUIRED, _OPTIONAL, redo=_REDO)
    meta: dict[str, Any] = dict(group.attrs["bigglm"])  # type: ignore[arg-type]
    if meta.get("kind") != "group":
        raise StoreError(f"{name}: is not a group store (a run store?); use bigglm.open_run")
    data = {
        key: (("subject", "voxel"), lazy_array(arrays[key], name))
        for key in ("effect", *_OPTIONAL)
        if key in arrays
    }
    coords = {
        "subject": ("subject", np.asarray(meta["subjects"], dtype=object)),
        "voxel": ("voxel", np.arange(arrays["effect"].shape[1], dtype=np.int64)),
        **{axis: ("voxel", read_small(arrays[axis], name)) for axis in "ijk"},
    }
    return xr.Dataset(
        {
            **data,
            "mask": (("x", "y", "z"), lazy_array(arrays["mask"], name)),
            "n_subjects": ("voxel", read_small(arrays["n_subjects"], name)),
        },
        coords=coords,
        attrs={**meta, "store": name, "tr": None},
    )
