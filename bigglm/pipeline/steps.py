"""The steps of a unit: convert, designs, fit, contrasts, residuals, provenance, report.

Each step runs unless its record says its outputs are current
(:mod:`bigglm.pipeline.records`: step keys, records and input checksums). Every step
takes one :class:`StepContext`, what a run shares between its steps, built once by
:func:`bigglm.pipeline.run_analysis`.

These are the building blocks of :func:`bigglm.pipeline.run_analysis`, internal to the
package; :mod:`bigglm.pipeline` lists the public names.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pandas as pd

from bigglm.config import AnalysisConfig, ModelConfig
from bigglm.exceptions import StoreDamaged, StoreError
from bigglm.io.artefacts import kind_of, marker, remove_stale_staging, target_lock, writing
from bigglm.pipeline.plan import RunPlan, UnitPlan, map_path, map_paths
from bigglm.pipeline.records import (
    Checksums,
    StepRecords,
    design_key,
    step_key,
    store_holds,
    store_identity,
    store_matches,
)
from bigglm.report import environment, file_record, write_json_atomic
from bigglm.typing import ContrastKind, ProgressCallback

__all__ = ["ProgressFactory", "StepContext", "UnitOutcome"]

logger = logging.getLogger(__name__)

#: ``progress_factory(description)`` returns a context manager yielding a callback.
ProgressFactory = Callable[[str], AbstractContextManager[ProgressCallback]]

#: The mask a run is converted with: a NIfTI (volumes), or a GIFTI file per hemisphere.
RunMask = Path | Mapping[str, Path]


@dataclass(frozen=True)
class StepContext:
    """What the steps of one run of an analysis share, built once by ``run_analysis``.

    Attributes
    ----------
    config : AnalysisConfig
        The analysis.
    client : distributed.Client
        The Dask client of the fit, residuals and conversions on workers.
    progress : ProgressFactory
        ``progress(description)`` yields a ``(done, total)`` callback.
    checksums : Checksums
        The SHA-256 of input files, remembered across runs.
    records : Mapping of str to StepRecords
        Per unit name: its finished steps, and the timings of this run's.
    """

    config: AnalysisConfig
    client: Any
    progress: ProgressFactory
    checksums: Checksums
    records: Mapping[str, StepRecords]

    @property
    def outputs(self) -> Path:
        """The analysis's outputs folder (``outputs.folder``)."""
        return self.config.outputs.folder

    def steps(self, unit: UnitPlan | str) -> StepRecords:
        """The step records of a unit (given or named)."""
        return self.records[unit if isinstance(unit, str) else unit.name]


@dataclass
class UnitOutcome:
    """What happened to one unit: steps run or reused, their timings, maps written."""

    name: str
    n_runs: int
    n_volumes: int
    n_voxels: int = 0
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    maps: list[Path] = field(default_factory=list)
    residuals: list[Path] = field(default_factory=list)
    peaks: dict[str, float] = field(default_factory=dict)
    provenance: Path | None = None
    report: Path | None = None


# --- the steps -----------------------------------------------------------------------------


def convert_step(ctx: StepContext, unit: UnitPlan, rp: RunPlan, mask: RunMask | None) -> None:
    """Convert one run here, unless its store is up to date.

    The store's lock (:func:`bigglm.io.artefacts.target_lock`) is held from the check to
    the commit: another analysis sharing ``store.folder`` that converts the same run at
    the same time waits, then finds the store up to date and reuses it, so a store
    another analysis is reading is not replaced by an identical one.
    """
    from bigglm.io import convert

    rp.store.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(rp.store):
        key = pending_conversion(ctx, unit, rp, mask)
        if key is None:
            return
        with (
            ctx.steps(unit).running(f"convert-{rp.run.name}", key),
            ctx.progress(f"convert {rp.run.name}") as cb,
        ):
            convert(
                series_sources(rp),
                rp.store,
                mask=mask,
                tr=rp.tr,
                overwrite=True,
                time_chunk=ctx.config.store.time_chunk,
                progress=cb,
            )


def pending_conversion(
    ctx: StepContext, unit: UnitPlan, rp: RunPlan, mask: RunMask | None
) -> str | None:
    """The convert step's key if the run's store must be made, None if it is up to date.

    A store made elsewhere (``bigglm convert``) from the same file is adopted. When a
    key is returned, the store's folder exists and no staging folder of a dead
    conversion of it is left (a live one's, e.g. another analysis's, is kept).
    """
    sums = ctx.checksums
    mask_sum = _mask_digest(sums, mask)
    digests = [sums(path) for path in rp.run.files]
    source = digests[0] if len(digests) == 1 else digests  # a volume run's key as it was
    key = step_key("convert", source, mask_sum, rp.tr, ctx.config.store.time_chunk)
    step = f"convert-{rp.run.name}"
    if not store_matches(rp, sums, mask):
        rp.store.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(rp.store.parent, folder=True)  # only dead writers': safe shared
        return key
    steps = ctx.steps(unit)
    if not steps.done(step, key, [rp.store]):  # made elsewhere (`bigglm convert`)
        steps.adopt(step, key)
    return None


def _mask_digest(sums: Checksums, mask: RunMask | None) -> str | dict[str, str] | None:
    """The SHA-256 of a mask file, or of each hemisphere's."""
    if mask is None or isinstance(mask, Path):
        return None if mask is None else sums(mask)
    return {hemi: sums(path) for hemi, path in mask.items()}


def _absolute(mask: RunMask | None) -> RunMask | None:
    if mask is None or isinstance(mask, Path):
        return None if mask is None else mask.resolve()
    return {hemi: path.resolve() for hemi, path in mask.items()}


def series_sources(rp: RunPlan, *, absolute: bool = False) -> Any:
    """What :func:`bigglm.convert` takes for a run: its bold, or a GIFTI run's
    ``{"L": left, "R": right}``; ``absolute``: resolved (for a worker, whose working
    directory need not be ours)."""
    files = [path.resolve() if absolute else path for path in rp.run.files]
    return files[0] if len(files) == 1 else dict(zip(("L", "R"), files, strict=True))


@dataclass
class Conversion:
    """One run to convert on a worker: the unit whose step it is, and with what key."""

    run: RunPlan
    mask: RunMask | None
    unit: str
    key: str
    sha256: list[str]


def convert_on_client(ctx: StepContext, jobs: Sequence[Conversion]) -> None:
    """Convert runs in parallel, one task per run on the client's workers.

    Each run's step is recorded as soon as its store is complete, so an interrupted
    analysis keeps every finished store. If conversions fail, the first error is raised
    once every run has ended.
    """
    from distributed import as_completed

    client = ctx.client
    futures = {
        client.submit(  # absolute paths: a worker's working directory need not be ours
            _timed_convert,
            series_sources(job.run, absolute=True),
            job.run.store.resolve(),
            _absolute(job.mask),
            job.run.tr,
            ctx.config.store.time_chunk,
            job.sha256,
            pure=False,
        ): job
        for job in jobs
    }
    logger.info("converting %d runs on the cluster's workers", len(jobs))
    errors: list[BaseException] = []
    with ctx.progress(f"convert {len(jobs)} runs") as cb:
        for done, future in enumerate(as_completed(futures, loop=client.loop), start=1):
            job = futures[future]
            try:
                seconds = future.result()
            except Exception as err:
                errors.append(err)
            else:
                ctx.steps(job.unit).record(f"convert-{job.run.run.name}", job.key, seconds)
            cb(done, len(jobs))
    if errors:
        raise errors[0]


def _timed_convert(
    bold: Any,
    store: Path,
    mask: RunMask | None,
    tr: float,
    time_chunk: int | None,
    sha256: str | list[str],
) -> float:
    """Convert one run (on a worker) and return how long it took.

    Under the store's lock, a store made meanwhile from the same file with the same
    voxels (by another analysis sharing ``store.folder``) is kept, as
    :func:`convert_step` does, so a store another analysis is reading is not replaced
    by an identical one.
    """
    from bigglm.io import convert

    start = time.perf_counter()
    with target_lock(store):
        if not store_holds(store, sha256, tr, mask):
            convert(bold, store, mask=mask, tr=tr, overwrite=True, time_chunk=time_chunk)
    return time.perf_counter() - start


def _remove_partials(target: Path) -> None:
    """Remove staging paths a dead writer of ``target`` left (never a live writer's)."""
    remove_stale_staging(target)


def remove_leftovers(unit: UnitPlan) -> None:
    """Delete staging files and folders that dead writers left in the unit's folder.

    Only what :func:`bigglm.io.artefacts.writing` recorded as its staging, and only once
    its writer is dead (:func:`bigglm.io.artefacts.remove_stale_staging`): a user's
    hidden file, or a live process's staging, is never touched.
    """
    if unit.folder.is_dir():
        remove_stale_staging(unit.folder, folder=True)


def epi_mask(ctx: StepContext, unit: UnitPlan) -> Path:
    """The mask of the unit's first store as a NIfTI, so every run uses the same voxels.

    Derived from the store each time (a small read) and rewritten only when it changed,
    so a first run converted again from changed data changes its unit's mask, and the
    key of every later run's conversion (which covers the mask's content) with it.
    """
    from bigglm.io import open_run

    path = ctx.config.store_folder / f"{unit.name}_desc-epi_mask.nii.gz"
    ds = open_run(unit.runs[0].store)
    _save_mask(path, np.asarray(ds["mask"].values), np.asarray(ds.attrs["affine"]))
    return path


def vertex_mask(ctx: StepContext, unit: UnitPlan) -> dict[str, Path]:
    """The vertices of a GIFTI unit's first store as a GIFTI mask per hemisphere, so that
    every run of the unit has the same columns (:func:`epi_mask` for surfaces).

    Rewritten only when they changed, as :func:`epi_mask` is.
    """
    from bigglm.io import open_run, to_gifti
    from bigglm.io.geometry import HEMISPHERES

    ds = open_run(unit.runs[0].store)
    entities = unit.map_prefix[len(unit.name) :]  # _space-<label>
    paths: dict[str, Path] = {}
    wanted: dict[str, np.ndarray] = {}
    for hemi, n_vertices in ds.attrs["hemispheres"].items():
        name = f"{unit.name}_hemi-{hemi}{entities}_desc-epi_mask.shape.gii"
        paths[hemi] = ctx.config.store_folder / name
        inside = np.zeros(int(n_vertices), np.uint8)
        inside[ds["vertex"].values[ds["hemisphere"].values == HEMISPHERES.index(hemi)]] = 1
        wanted[hemi] = inside
    if not all(_holds(paths[h], wanted[h]) for h in paths):
        targets: dict[str, str | os.PathLike[str]] = dict(paths)
        to_gifti(np.ones(ds.sizes["voxel"], bool), ds, targets, overwrite=True)
    return paths


def _holds(path: Path, values: np.ndarray) -> bool:
    """``path`` is a GIFTI image bigglm wrote, holding exactly ``values``."""
    if kind_of(path) != "image":
        return False
    arrays = _image(path).darrays
    return len(arrays) == 1 and np.array_equal(arrays[0].data, values)


def first_run_mask(ctx: StepContext, unit: UnitPlan) -> RunMask:
    """The mask of a unit's later runs, made from its first run's store: the EPI mask
    (volumes), or the first run's vertices (GIFTI)."""
    return vertex_mask(ctx, unit) if unit.geometry == "vertex" else epi_mask(ctx, unit)


def intersection_mask(ctx: StepContext, unit: UnitPlan) -> Path:
    """The voxels inside every brain mask the unit's runs have (fMRIPrep: one per run)."""
    paths = sorted({rp.run.mask for rp in unit.runs if rp.run.mask is not None})
    images = [_image(p) for p in paths]
    inside = np.all(np.stack([np.asarray(img.dataobj) > 0 for img in images]), axis=0)
    path = ctx.config.store_folder / f"{unit.name}_desc-intersection_mask.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_mask(path, inside, np.asarray(images[0].affine))
    logger.info("%s: the runs' masks differ; using their intersection (%s)", unit.name, path)
    return path


def _image(path: Path) -> Any:
    return nib.load(path)


def _save_mask(path: Path, inside: np.ndarray, affine: np.ndarray) -> None:
    """Write a uint8 mask NIfTI atomically; rewrite only if its content would change."""
    data = np.asarray(inside, dtype=np.uint8)
    if kind_of(path) == "mask" and np.array_equal(np.asarray(_image(path).dataobj), data):
        return
    image = nib.Nifti1Image(data, affine.astype(float))
    image.header["descrip"] = marker("mask").encode()
    with writing(path, "mask", overwrite=True, suffix=".nii.gz") as temp:
        nib.save(image, temp)


def design_step(ctx: StepContext, unit: UnitPlan) -> list[Path]:
    """Each run's design as a TSV beside the maps."""
    steps = ctx.steps(unit)
    paths = [unit.folder / f"{rp.run.name}_design.tsv" for rp in unit.runs]
    key = design_key(unit)
    if steps.done("designs", key, paths):
        return paths
    with steps.running("designs", key):
        for rp, path in zip(unit.runs, paths, strict=True):
            with writing(path, "design-table", overwrite=True) as temp:
                rp.design.to_csv(temp, sep="\t", index=False, float_format="%.10g")
    return paths


def fit_step(ctx: StepContext, unit: UnitPlan) -> tuple[Any, str]:
    """The unit's GLM, fitted (or read back) and stored; returned with the step's key."""
    from bigglm.glm import GLMResult, fit
    from bigglm.io import open_run

    config, steps = ctx.config, ctx.steps(unit)
    path = unit.folder / f"{unit.name}_glm.zarr"
    scaling = config.model.global_scaling
    key = step_key(
        "fit",
        config.model.noise,
        [store_identity(rp.store) for rp in unit.runs],
        design_key(unit),
        *([scaling] if scaling != "none" else []),  # keys of unscaled fits stay as they were
    )
    if steps.done("fit", key, [path]):
        return GLMResult.from_zarr(path), key
    _remove_partials(path)
    with (
        steps.running("fit", key),
        ctx.progress(f"fit {unit.name}") as callback,
        damaged_stores_set_aside(unit),
    ):
        runs = [open_run(rp.store) for rp in unit.runs]
        designs = [rp.design for rp in unit.runs]
        result = fit(runs, designs, noise=config.model.noise, scaling=scaling, client=ctx.client)
        result.compute(progress=callback).to_zarr(path, overwrite=True)
    # Contrasts always come from the stored result, so a resumed run computes them from
    # exactly the same numbers as an uninterrupted one.
    return GLMResult.from_zarr(path), key


@contextmanager
def damaged_stores_set_aside(unit: UnitPlan) -> Iterator[None]:
    """A store of the unit found damaged while it is read is moved aside (not deleted),
    so that the next run converts the run anew instead of reusing the store: its digest
    of the source still matches, and only a full read finds a flipped byte. A store
    another process replaced meanwhile (its folder is not the one read) is left alone:
    it is that process's new store, and what failed was reading the old one's chunks
    from it."""
    read = {rp.store: _folder_id(rp.store) for rp in unit.runs}
    try:
        yield
    except StoreDamaged as err:
        raise _set_aside(err, unit, read) from None


def _folder_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, None if it is missing: a rename into place changes it."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _set_aside(
    err: StoreDamaged, unit: UnitPlan, read: dict[Path, tuple[int, int] | None]
) -> StoreError:
    damaged = Path(err.store).resolve()
    for rp in unit.runs:
        if rp.store.resolve() != damaged:
            continue
        if _folder_id(rp.store) != read.get(rp.store):
            return StoreError(
                f"{rp.store}: was replaced by another process while this analysis read it "
                "(another analysis sharing the store folder, or bigglm.convert); "
                "nothing was set aside, run the analysis again"
            )
        if kind_of(rp.store) == "run-store":
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            aside = rp.store.with_name(f".{rp.store.name}.damaged-{stamp}")
            os.rename(rp.store, aside)
            logger.warning("%s: damaged; moved to %s", rp.store, aside)
            return StoreError(
                f"{err.args[0].split('; ')[0]}; the store was moved to {aside}, so running "
                "the analysis again converts the run anew (delete that copy when done)"
            )
    return err


def maps_step(
    ctx: StepContext, unit: UnitPlan, result: Any, fit_key: str, outcome: UnitOutcome
) -> None:
    """Each contrast's maps, from the stored fit ``result``.

    The step's key covers the maps' file names: maps an earlier version wrote under other
    names (``stat-stat`` before bigglm named the statistic ``stat-t``/``stat-F``) do not
    count as this step's outputs, so the maps are written under the new names, and the
    old files are left where they are (bigglm deletes no output it no longer writes).
    """
    from bigglm.glm.contrasts import default_kind
    from bigglm.glm.result import contrast_maps
    from bigglm.io import to_nifti

    config, steps = ctx.config, ctx.steps(unit)
    like = unit.runs[0].store
    if unit.geometry != "voxel":
        _surface_maps(ctx, unit, result, fit_key, outcome)
        return
    for name, expression in config.contrasts.items():
        kind: ContrastKind = default_kind(expression)
        paths = {stat: map_path(config, unit.name, name, stat) for stat in config.outputs.maps}
        key = step_key(
            "contrast", fit_key, expression, kind, sorted(p.name for p in paths.values())
        )
        outcome.maps.extend(paths.values())
        if steps.done(f"contrast-{name}", key, list(paths.values())):
            if "z" in paths:
                outcome.peaks[name] = _peak(np.asarray(_image(paths["z"]).dataobj))
            continue
        with steps.running(f"contrast-{name}", key):
            values = result.contrast(expression, kind=kind)
            images = contrast_maps(values)
            for stat, path in paths.items():
                to_nifti(images[stat], like, path, overwrite=True)
        outcome.peaks[name] = _peak(np.asarray(values["z"]))


def _surface_maps(
    ctx: StepContext, unit: UnitPlan, result: Any, fit_key: str, outcome: UnitOutcome
) -> None:
    """:func:`maps_step` for surface runs: GIFTI maps per hemisphere, or CIFTI-2 dense
    scalars, written as :meth:`bigglm.GLMResult.to_nifti` writes them."""
    from bigglm.glm.contrasts import default_kind
    from bigglm.glm.persistence import MapFormat
    from bigglm.glm.result import contrast_maps

    config, steps = ctx.config, ctx.steps(unit)
    grid = MapFormat.of(unit.runs[0].store)
    for name, expression in config.contrasts.items():
        kind: ContrastKind = default_kind(expression)
        paths = {stat: map_paths(config, unit, name, stat) for stat in config.outputs.maps}
        files = [path for group in paths.values() for path in group]
        key = step_key("contrast", fit_key, expression, kind, sorted(p.name for p in files))
        outcome.maps.extend(files)
        if steps.done(f"contrast-{name}", key, files):
            if "z" in paths:
                outcome.peaks[name] = _peak(np.concatenate([_map_values(p) for p in paths["z"]]))
            continue
        with steps.running(f"contrast-{name}", key):
            values = result.contrast(expression, kind=kind)
            images = contrast_maps(values)
            for stat, group in paths.items():
                grid.write(images[stat], group, overwrite=True)
        outcome.peaks[name] = _peak(np.asarray(values["z"]))


def _map_values(path: Path) -> np.ndarray:
    """The values of a written map: a GIFTI file's data arrays, else the image's data."""
    image = _image(path)
    if isinstance(image, nib.GiftiImage):
        return np.concatenate([np.ravel(d.data) for d in image.darrays])
    return np.ravel(np.asarray(image.dataobj))


def residuals_step(
    ctx: StepContext, unit: UnitPlan, result: Any, fit_key: str, outcome: UnitOutcome
) -> None:
    """Each run's residuals (``outputs.residuals``), beside the maps: a second pass."""
    from bigglm.glm.residuals import file_name

    options, steps = ctx.config.outputs.residuals, ctx.steps(unit)
    if options is None:
        return
    prefixes = [rp.run.name for rp in unit.runs]
    fmt, whitened = options.format, options.whitened
    paths = [unit.folder / file_name(p, whitened=whitened, format=fmt) for p in prefixes]
    outcome.residuals.extend(paths)
    key = step_key("residuals", fit_key, whitened, fmt, [p.name for p in paths])
    if steps.done("residuals", key, paths):
        return
    with steps.running("residuals", key), damaged_stores_set_aside(unit):
        result.write_residuals(
            unit.folder, prefixes, whitened=whitened, format=fmt, overwrite=True, client=ctx.client
        )


def _peak(z: np.ndarray) -> float:
    """The largest ``|z|`` (NaN when no voxel has a finite z)."""
    finite = np.abs(z[np.isfinite(z)])
    return float(finite.max()) if finite.size else float("nan")


def provenance_step(ctx: StepContext, unit: UnitPlan, outcome: UnitOutcome, started: str) -> Path:
    """The unit's provenance record: configuration, versions, inputs, steps, outputs."""
    inputs = []
    for rp in unit.runs:
        for path in (*rp.run.files, rp.run.events, rp.run.confounds, rp.run.mask):
            if path is not None:
                record = file_record(path)
                inputs.append(record)
    record = {
        "bigglm_step": "first-level",
        "unit": unit.name,
        "started": started,
        "finished": datetime.now(UTC).isoformat(),
        "config": ctx.config.model_dump(mode="json"),
        "environment": environment(),
        "inputs": inputs,
        "runs": [
            {
                "name": rp.run.name,
                "tr": rp.tr,
                "n_scans": rp.n_scans,
                "slice_time_ref": rp.slice_time_ref,
                "store": str(rp.store),
            }
            for rp in unit.runs
        ],
        "steps": outcome.steps,
        "outputs": [str(p) for p in (*outcome.maps, *outcome.residuals)],
    }
    path = unit.folder / f"{unit.name}_provenance.json"
    return write_json_atomic(path, record, artefact=True)


#: The first-level report's threshold rule: nilearn's ``make_glm_report`` defaults.
REPORT_ALPHA = 0.001
REPORT_HEIGHT_CONTROL: Literal["fpr"] = "fpr"


def report_step(ctx: StepContext, unit: UnitPlan, outcome: UnitOutcome) -> Path:
    """The unit's HTML report (model, designs and their diagnostics, contrasts drawn over
    the design, thresholded maps over the MNI template with their cluster tables, or on
    fsaverage5 for GIFTI runs, steps);
    cheap next to the fit, so always rewritten."""
    from bigglm.report.html import write_html_report

    config = ctx.config
    model = config.model
    facts = [
        ("runs", ", ".join(rp.run.name for rp in unit.runs)),
        ("volumes", str(outcome.n_volumes)),
        ("voxels", str(outcome.n_voxels)),
        ("provenance", str(outcome.provenance)),
    ]
    if outcome.residuals and config.outputs.residuals is not None:
        kind = "whitened" if config.outputs.residuals.whitened else "raw"
        facts.append((f"residuals ({kind})", ", ".join(p.name for p in outcome.residuals)))
    first = unit.runs[0]
    parameters = [
        ("design convention", model.convention),
        ("HRF", model.basis),
        ("drift", _drift_text(model)),
        ("noise model", model.noise),
        ("global scaling", model.global_scaling),
        ("TR", f"{first.tr:g} s"),
        ("slice timing reference", f"{first.slice_time_ref:g} of the TR"),
    ]
    return write_html_report(
        unit.folder / f"{unit.name}_report.html",
        title=unit.name,
        designs={rp.run.name: rp.design for rp in unit.runs},
        z_maps={},
        steps=outcome.steps,
        facts=facts,
        model=parameters,
        contrast_weights={rp.run.name: _weights(config, rp.design) for rp in unit.runs},
        stat_maps=_report_maps(config, unit) if unit.geometry == "voxel" else [],
        mask=_mask_image(first.store) if unit.geometry == "voxel" else None,
        **_surface_report(config, unit),
    )


def _surface_report(config: Any, unit: UnitPlan) -> dict[str, Any]:
    """The report's surface figures of a GIFTI unit on fsaverage5 (z on nilearn's mesh,
    at the volume report's threshold), or its one-line note on any other mesh."""
    from scipy.stats import norm

    from bigglm.io import open_run
    from bigglm.report.surface import FSAVERAGE5_VERTICES, SurfaceSection, surface_mesh

    if unit.geometry == "voxel":
        return {}
    if unit.geometry != "vertex":
        note = "No surface figures: the maps are CIFTI-2 grayordinates (e.g. fsLR), a mesh"
        return {"surface_note": f"{note} nilearn does not ship."}
    hemispheres = dict(open_run(unit.runs[0].store).attrs["hemispheres"])
    if surface_mesh(hemispheres) is None:
        counts = " and ".join(f"{n} ({h})" for h, n in hemispheres.items())
        return {
            "surface_note": f"No surface figures: the mesh has {counts} vertices; nilearn "
            f"ships fsaverage5 ({FSAVERAGE5_VERTICES} per hemisphere), not this mesh."
        }
    if "z" not in config.outputs.maps:
        return {"surface_note": "No surface figures: 'z' is not among outputs.maps."}
    # REPORT_HEIGHT_CONTROL is "fpr": the cut is the z of alpha, whatever the map.
    cut = float(norm.isf(REPORT_ALPHA))
    rule = f"{REPORT_HEIGHT_CONTROL} at alpha {REPORT_ALPHA:g}, one-sided (nilearn's report)"
    sections = []
    for name in config.contrasts:
        paths = map_paths(config, unit, name, "z")
        z_maps = {h: p for h, p in zip(("L", "R"), paths, strict=True) if h in hemispheres}
        files = [p for stat in config.outputs.maps for p in map_paths(config, unit, name, stat)]
        sections.append(SurfaceSection(name, z_maps, cut, f"Parametric: {rule}.", files))
    return {"surface_maps": sections}


def _mask_image(store: Path) -> Any:
    """The store's analysis mask as a NIfTI image (uint8, on the store's grid)."""
    from bigglm.io import open_run

    ds = open_run(store)
    inside = np.asarray(ds["mask"].compute(scheduler="threads").values, dtype=np.uint8)
    return nib.Nifti1Image(inside, np.asarray(ds.attrs["affine"], dtype=np.float64))


def _weights(config: Any, design: pd.DataFrame) -> pd.DataFrame:
    """Every contrast row over one run's design columns (F contrasts: one row each)."""
    from bigglm.glm.contrasts import contrast_rows

    columns = [str(c) for c in design.columns]
    rows, labels = [], []
    for name, expression in config.contrasts.items():
        matrix = contrast_rows(expression, columns, name=name)
        rows += list(matrix)
        labels += [name] if len(matrix) == 1 else [f"{name}[{i}]" for i in range(len(matrix))]
    return pd.DataFrame(rows, index=labels, columns=columns)


def _report_maps(config: Any, unit: UnitPlan) -> list[Any]:
    """Per contrast with a z map: the map thresholded by nilearn's report rule, and its
    clusters (mm coordinates)."""
    from bigglm.inference import clusters_table, threshold
    from bigglm.report.group import ContrastSection

    if "z" not in config.outputs.maps:
        return []
    sections = []
    rule = f"{REPORT_HEIGHT_CONTROL} at alpha {REPORT_ALPHA:g}, one-sided (nilearn's report)"
    for name in config.contrasts:
        z_path = map_path(config, unit.name, name, "z")
        _, cut = threshold(
            z_path, alpha=REPORT_ALPHA, height_control=REPORT_HEIGHT_CONTROL, two_sided=False
        )
        table = clusters_table(z_path, cut)
        files = [map_path(config, unit.name, name, s) for s in config.outputs.maps]
        section = ContrastSection(name, {}, z_path, float(cut), rule=f"Parametric: {rule}.")
        section.tables[f"Clusters at z ≥ {cut:.3f}"] = table
        section.files = files
        sections.append(section)
    return sections


def _drift_text(model: ModelConfig) -> str:
    """How the low frequencies are modelled, in the convention's own units."""
    if model.convention != "nilearn":
        cutoff = model.design_options()["high_pass"]
        return f"SPM DCT set, cut-off period {cutoff:g} s" if cutoff else "none"
    return f"{model.drift} (high-pass {model.high_pass:g} Hz)" if model.drift else "none"
