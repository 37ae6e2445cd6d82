"""The steps of a unit, each recorded with a digest of its inputs so a rerun can skip it.

Every step's key comes from :func:`step_key`: the step's name, the version of its code
(:data:`STEP_VERSIONS`) and every input that changes its output: files by content
(SHA-256), stores by :func:`store_identity` (their sources, grid, TR, conversion
parameters and voxels), designs by their values, and the options the step uses. A
downstream step's key includes its upstream steps' keys or identities, so a rerun
recomputes exactly the steps whose inputs changed.

A step's record (``<outputs>/.bigglm/steps/<unit>/<step>.json``) is written only after
its outputs are complete (each written under a temporary name, then renamed), so a run
killed at any point leaves either a finished step or none.

These are the building blocks of :func:`bigglm.pipeline.run_analysis`, internal to the
package; :mod:`bigglm.pipeline` lists the public names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bigglm.config import AnalysisConfig
from bigglm.exceptions import StoreDamaged, StoreError
from bigglm.io.artefacts import kind_of, marker, remove_stale_staging, target_lock, writing
from bigglm.pipeline.plan import STATE, RunPlan, UnitPlan, map_path
from bigglm.report import environment, file_record, sha256_file, write_json_atomic
from bigglm.typing import ContrastKind, ProgressCallback

__all__ = ["ProgressFactory", "UnitOutcome"]

logger = logging.getLogger(__name__)

#: ``progress_factory(description)`` returns a context manager yielding a callback.
ProgressFactory = Callable[[str], AbstractContextManager[ProgressCallback]]


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


# --- step records: what is finished, with which inputs -------------------------------------


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _frame_digest(frame: pd.DataFrame) -> str:
    return hashlib.sha256(frame.to_csv(sep="\t", float_format="%.17g").encode()).hexdigest()


#: The version of each step's code. Bump a step's number when it would write other
#: outputs from the same inputs: every record made by the older code is then stale.
STEP_VERSIONS: dict[str, int] = {
    "convert": 2,
    "designs": 2,
    "fit": 2,
    "contrast": 2,
    "residuals": 2,
}


def step_key(step: str, *inputs: Any) -> str:
    """The key of a step: a digest of its name, its code version and all its inputs.

    Examples
    --------
    >>> step_key("fit", "ols") == step_key("fit", "ols") != step_key("fit", "ar1")
    True
    """
    return _digest(step, STEP_VERSIONS[step], *inputs)


def store_identity(path: Path) -> str:
    """The content identity of a converted store, read from its attributes and mask.

    It covers what the store's values depend on: the SHA-256 of its sources, its grid
    (affine, volume shape), TR, conversion parameters (chunks, codec, dtype) and its
    voxels (a digest of the mask array), not where it lies nor when it was made.

    Raises
    ------
    StoreError
        If ``path`` is not a readable store.
    """
    from bigglm.io import open_run

    ds = open_run(path)
    attrs = ds.attrs
    mask = np.asarray(ds["mask"].values, dtype=bool)
    parameters = {k: v for k, v in dict(attrs.get("parameters", {})).items() if k != "mask"}
    return _digest(
        [source.get("sha256") for source in attrs.get("sources", [])],
        attrs.get("affine"),
        attrs.get("volume_shape"),
        attrs.get("tr"),
        parameters,
        int(ds.sizes["time"]),
        hashlib.sha256(np.packbits(mask).tobytes()).hexdigest(),
    )


class StepRecords:
    """Records of finished steps for one unit, and their timings for the provenance."""

    def __init__(self, outputs: Path, unit: str) -> None:
        self.folder = outputs / STATE / "steps" / unit
        self.timings: dict[str, dict[str, Any]] = {}

    def done(self, step: str, key: str, outputs: Sequence[Path]) -> bool:
        record = self.folder / f"{step}.json"
        try:
            stored = json.loads(record.read_text())
        except (OSError, ValueError):
            return False
        finished = stored.get("key") == key and all(Path(p).exists() for p in outputs)
        if finished and step not in self.timings:  # not run earlier in this session
            self.timings[step] = {"status": "reused", "seconds": stored.get("seconds", 0.0)}
            logger.info("%s: %s already done, skipped", self.folder.name, step)
        return finished

    def adopt(self, step: str, key: str) -> None:
        """Record as finished a step whose outputs were made outside this workflow."""
        logger.info(
            "%s: %s: reusing an existing output made from the same inputs", self.folder.name, step
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        finished = datetime.now(UTC).isoformat()
        write_json_atomic(
            self.folder / f"{step}.json", {"key": key, "seconds": 0.0, "finished": finished}
        )
        self.timings[step] = {"status": "reused", "seconds": 0.0}

    @contextmanager
    def running(self, step: str, key: str) -> Iterator[None]:
        start = time.perf_counter()
        logger.info("%s: %s ...", self.folder.name, step)
        yield
        self.record(step, key, time.perf_counter() - start)

    def record(self, step: str, key: str, seconds: float) -> None:
        """Record a step that ran (here or on a worker) as finished."""
        seconds = round(seconds, 3)
        self.folder.mkdir(parents=True, exist_ok=True)
        finished = datetime.now(UTC).isoformat()
        write_json_atomic(
            self.folder / f"{step}.json", {"key": key, "seconds": seconds, "finished": finished}
        )
        self.timings[step] = {"status": "ran", "seconds": seconds}


# --- the steps -----------------------------------------------------------------------------


#: (resolved path, size, mtime_ns, ctime_ns, inode) of an input file.
_StatKey = tuple[str, int, int, int, int]

#: Files modified this recently before hashing are not remembered (nanoseconds).
_SETTLE_NS = 2_000_000_000


class Checksums:
    """SHA-256 of input files, computed once and remembered across runs.

    With a ``folder`` (the workflow's ``<outputs>/.bigglm/checksums``), each digest is
    kept in a small file keyed by the input's resolved path, with the file's size, inode,
    modification and change times (as git's index does): a rerun reads again only the
    files that changed, not the whole dataset. Any change of content changes the change
    time (which no user call can set back), so a stale digest is never reused. A file
    modified less than :data:`_SETTLE_NS` before it was hashed is not remembered (it may
    still be being written within the same timestamp tick).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = f.write_text("abc")
    >>> Checksums()(f)[:16]
    'ba7816bf8f01cfea'
    """

    def __init__(self, folder: Path | None = None) -> None:
        self._known: dict[_StatKey, str] = {}
        self._folder = folder

    def __call__(self, path: Path) -> str:
        key = self._key(path)
        if key not in self._known:
            digest = self._stored(key)
            if digest is None:
                started = time.time_ns()
                digest = sha256_file(path)
                self._remember(key, digest, started)
            self._known[key] = digest
        return self._known[key]

    def prefetch(self, paths: Sequence[Path], client: Any) -> None:
        """Hash the files not known yet on the client's workers, in parallel.

        The files must be readable by the workers (a shared filesystem, as for
        conversion on workers).
        """
        todo = []
        for key, path in {self._key(p): p for p in paths}.items():
            if key not in self._known and (digest := self._stored(key)) is not None:
                self._known[key] = digest
            if key not in self._known:
                todo.append((key, path))
        if not todo:
            return
        started = time.time_ns()
        # absolute: a worker's working directory need not be this process's
        futures = client.map(sha256_file, [str(p.resolve()) for _, p in todo], pure=False)
        for (key, _), digest in zip(todo, client.gather(futures), strict=True):
            self._known[key] = digest
            self._remember(key, digest, started)

    def _entry(self, key: _StatKey) -> Path | None:
        if self._folder is None:
            return None
        return self._folder / f"{hashlib.sha256(key[0].encode()).hexdigest()[:32]}.json"

    def _stored(self, key: _StatKey) -> str | None:
        """The remembered digest of a file in exactly this state, if any."""
        entry = self._entry(key)
        if entry is None:
            return None
        try:
            record = json.loads(entry.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("stat") != list(key):
            return None
        digest = record.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def _remember(self, key: _StatKey, digest: str, started: int) -> None:
        entry = self._entry(key)
        if entry is None or key[2] > started - _SETTLE_NS:
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(entry, {"stat": list(key), "sha256": digest})

    @staticmethod
    def _key(path: Path) -> _StatKey:
        stat = path.stat()
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def convert_step(
    unit: UnitPlan,
    rp: RunPlan,
    mask: Path | None,
    steps: StepRecords,
    sums: Checksums,
    config: AnalysisConfig,
    progress: ProgressFactory,
) -> None:
    """Convert one run here, unless its store is up to date.

    The store's lock (:func:`bigglm.io.artefacts.target_lock`) is held from the check to
    the commit: another analysis sharing ``store.folder`` that converts the same run at
    the same time waits, then finds the store up to date and reuses it, so a store
    another analysis is reading is not replaced by an identical one.
    """
    from bigglm.io import convert

    rp.store.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(rp.store):
        key = pending_conversion(rp, mask, steps, sums, config)
        if key is None:
            return
        with (
            steps.running(f"convert-{rp.run.name}", key),
            progress(f"convert {rp.run.name}") as cb,
        ):
            convert(
                rp.run.bold,
                rp.store,
                mask=mask,
                tr=rp.tr,
                overwrite=True,
                time_chunk=config.store.time_chunk,
                progress=cb,
            )


def pending_conversion(
    rp: RunPlan, mask: Path | None, steps: StepRecords, sums: Checksums, config: AnalysisConfig
) -> str | None:
    """The convert step's key if the run's store must be made, None if it is up to date.

    A store made elsewhere (``bigglm convert``) from the same file is adopted. When a
    key is returned, the store's folder exists and no staging folder of a dead
    conversion of it is left (a live one's, e.g. another analysis's, is kept).
    """
    mask_sum = sums(mask) if mask is not None else None
    key = step_key("convert", sums(rp.run.bold), mask_sum, rp.tr, config.store.time_chunk)
    step = f"convert-{rp.run.name}"
    if not _store_matches(rp, sums, mask):
        rp.store.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(rp.store.parent, folder=True)  # only dead writers': safe shared
        return key
    if not steps.done(step, key, [rp.store]):  # made elsewhere (`bigglm convert`)
        steps.adopt(step, key)
    return None


@dataclass
class Conversion:
    """One run to convert on a worker: where its step is recorded, and with what key."""

    run: RunPlan
    mask: Path | None
    steps: StepRecords
    key: str
    sha256: str


def convert_on_client(
    jobs: Sequence[Conversion], config: AnalysisConfig, client: Any, progress: ProgressFactory
) -> None:
    """Convert runs in parallel, one task per run on the client's workers.

    Each run's step is recorded as soon as its store is complete, so an interrupted
    analysis keeps every finished store. If conversions fail, the first error is raised
    once every run has ended.
    """
    from distributed import as_completed

    futures = {
        client.submit(  # absolute paths: a worker's working directory need not be ours
            _timed_convert,
            job.run.run.bold.resolve(),
            job.run.store.resolve(),
            None if job.mask is None else job.mask.resolve(),
            job.run.tr,
            config.store.time_chunk,
            job.sha256,
            pure=False,
        ): job
        for job in jobs
    }
    logger.info("converting %d runs on the cluster's workers", len(jobs))
    errors: list[BaseException] = []
    with progress(f"convert {len(jobs)} runs") as cb:
        for done, future in enumerate(as_completed(futures, loop=client.loop), start=1):
            job = futures[future]
            try:
                seconds = future.result()
            except Exception as err:
                errors.append(err)
            else:
                job.steps.record(f"convert-{job.run.run.name}", job.key, seconds)
            cb(done, len(jobs))
    if errors:
        raise errors[0]


def _timed_convert(
    bold: Path, store: Path, mask: Path | None, tr: float, time_chunk: int | None, sha256: str
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
        if not _store_holds(store, sha256, tr, mask):
            convert(bold, store, mask=mask, tr=tr, overwrite=True, time_chunk=time_chunk)
    return time.perf_counter() - start


def _store_matches(rp: RunPlan, sums: Checksums, mask: Path | None) -> bool:
    """A complete store exists, made from a file with the same SHA-256 and the same TR.

    With ``mask``, the store's voxels must also be those of that mask (less the voxels
    with non-finite values that conversion dropped, as its attributes record).
    """
    return _store_holds(rp.store, sums(rp.run.bold), rp.tr, mask)


def _store_holds(store: Path, sha256: str, tr: float, mask: Path | None) -> bool:
    """:func:`_store_matches` for a store, a source digest and a TR (on a worker too)."""
    from bigglm.io import open_run

    if not store.exists():
        return False
    try:
        ds = open_run(store)
    except StoreError:
        return False
    recorded = [s.get("sha256") for s in ds.attrs.get("sources", [])]
    if recorded != [sha256] or abs(float(ds.attrs.get("tr", 0)) - tr) > 1e-9:
        return False
    return mask is None or _has_voxels_of(ds, mask)


def _has_voxels_of(ds: Any, mask: Path) -> bool:
    """The store's voxels are the mask's, less the non-finite ones conversion dropped."""
    wanted = np.asarray(_image(mask).dataobj)
    wanted = np.isfinite(wanted) & (wanted != 0)
    inside = np.asarray(ds["mask"].values, dtype=bool)
    if inside.shape != wanted.shape or (inside & ~wanted).any():
        return False
    dropped = int(dict(ds.attrs.get("parameters", {})).get("nonfinite_voxels_dropped", 0))
    return int(wanted.sum()) - int(inside.sum()) == dropped


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


def epi_mask(unit: UnitPlan, config: AnalysisConfig) -> Path:
    """The mask of the unit's first store as a NIfTI, so every run uses the same voxels.

    Derived from the store each time (a small read) and rewritten only when it changed,
    so a first run converted again from changed data changes its unit's mask, and the
    key of every later run's conversion (which covers the mask's content) with it.
    """
    from bigglm.io import open_run

    path = config.store_folder / f"{unit.name}_desc-epi_mask.nii.gz"
    ds = open_run(unit.runs[0].store)
    _save_mask(path, np.asarray(ds["mask"].values), np.asarray(ds.attrs["affine"]))
    return path


def intersection_mask(unit: UnitPlan, config: AnalysisConfig) -> Path:
    """The voxels inside every brain mask the unit's runs have (fMRIPrep: one per run)."""
    paths = sorted({rp.run.mask for rp in unit.runs if rp.run.mask is not None})
    images = [_image(p) for p in paths]
    inside = np.logical_and.reduce([np.asarray(img.dataobj) > 0 for img in images])
    path = config.store_folder / f"{unit.name}_desc-intersection_mask.nii.gz"
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


def design_key(unit: UnitPlan) -> str:
    """The key of the designs step: the values of every run's design."""
    return step_key("designs", [_frame_digest(rp.design) for rp in unit.runs])


def design_step(unit: UnitPlan, steps: StepRecords) -> list[Path]:
    paths = [unit.folder / f"{rp.run.name}_design.tsv" for rp in unit.runs]
    key = design_key(unit)
    if steps.done("designs", key, paths):
        return paths
    with steps.running("designs", key):
        for rp, path in zip(unit.runs, paths, strict=True):
            with writing(path, "design-table", overwrite=True) as temp:
                rp.design.to_csv(temp, sep="\t", index=False, float_format="%.10g")
    return paths


def fit_step(
    unit: UnitPlan,
    config: AnalysisConfig,
    steps: StepRecords,
    client: Any,
    progress: ProgressFactory,
) -> tuple[Any, str]:
    from bigglm.glm import GLMResult, fit
    from bigglm.io import open_run

    path = unit.folder / f"{unit.name}_glm.zarr"
    key = step_key(
        "fit",
        config.model.noise,
        [store_identity(rp.store) for rp in unit.runs],
        design_key(unit),
    )
    if steps.done("fit", key, [path]):
        return GLMResult.from_zarr(path), key
    _remove_partials(path)
    with (
        steps.running("fit", key),
        progress(f"fit {unit.name}") as callback,
        damaged_stores_set_aside(unit),
    ):
        runs = [open_run(rp.store) for rp in unit.runs]
        designs = [rp.design for rp in unit.runs]
        result = fit(runs, designs, noise=config.model.noise, client=client)
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
    unit: UnitPlan,
    config: AnalysisConfig,
    result: Any,
    fit_key: str,
    steps: StepRecords,
    outcome: UnitOutcome,
) -> None:
    from bigglm.glm.contrasts import default_kind
    from bigglm.glm.result import contrast_maps
    from bigglm.io import to_nifti

    like = unit.runs[0].store
    for name, expression in config.contrasts.items():
        kind: ContrastKind = default_kind(expression)
        paths = {stat: map_path(config, unit.name, name, stat) for stat in config.outputs.maps}
        key = step_key("contrast", fit_key, expression, kind, sorted(paths))
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


def residuals_step(
    unit: UnitPlan,
    config: AnalysisConfig,
    result: Any,
    fit_key: str,
    steps: StepRecords,
    outcome: UnitOutcome,
    client: Any,
) -> None:
    """Each run's residuals (``outputs.residuals``), beside the maps: a second pass."""
    from bigglm.glm.residuals import file_name

    options = config.outputs.residuals
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
            unit.folder, prefixes, whitened=whitened, format=fmt, overwrite=True, client=client
        )


def _peak(z: np.ndarray) -> float:
    """The largest ``|z|`` (NaN when no voxel has a finite z)."""
    finite = np.abs(z[np.isfinite(z)])
    return float(finite.max()) if finite.size else float("nan")


def provenance_step(
    unit: UnitPlan,
    config: AnalysisConfig,
    outcome: UnitOutcome,
    sums: Checksums,
    started: str,
) -> Path:
    inputs = []
    for rp in unit.runs:
        for path in (rp.run.bold, rp.run.events, rp.run.confounds, rp.run.mask):
            if path is not None:
                record = file_record(path)
                inputs.append(record)
    record = {
        "bigglm_step": "first-level",
        "unit": unit.name,
        "started": started,
        "finished": datetime.now(UTC).isoformat(),
        "config": config.model_dump(mode="json"),
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


def report_step(unit: UnitPlan, config: AnalysisConfig, outcome: UnitOutcome) -> Path:
    """The unit's HTML report (designs, z mosaics, steps); cheap, so always rewritten."""
    from bigglm.report.html import write_html_report

    z_maps = {
        name: np.asarray(_image(map_path(config, unit.name, name, "z")).dataobj)
        for name in config.contrasts
        if "z" in config.outputs.maps
    }
    facts = [
        ("runs", ", ".join(rp.run.name for rp in unit.runs)),
        ("volumes", str(outcome.n_volumes)),
        ("voxels", str(outcome.n_voxels)),
        ("noise model", config.model.noise),
        ("provenance", str(outcome.provenance)),
    ]
    if outcome.residuals and config.outputs.residuals is not None:
        kind = "whitened" if config.outputs.residuals.whitened else "raw"
        facts.append((f"residuals ({kind})", ", ".join(p.name for p in outcome.residuals)))
    return write_html_report(
        unit.folder / f"{unit.name}_report.html",
        title=unit.name,
        designs={rp.run.name: rp.design for rp in unit.runs},
        z_maps=z_maps,
        steps=outcome.steps,
        facts=facts,
    )
