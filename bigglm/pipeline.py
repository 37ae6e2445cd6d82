"""The first-level workflow behind ``bigglm run``: validate, convert, design, fit, contrast, map.

:func:`plan` checks a configuration and its inputs in seconds (files exist, TRs and
lengths agree, designs build, contrasts name real columns) before any long work;
:func:`run_analysis` then works through each *unit* (the runs of one subject and task,
fitted together):

1. convert each run to a Zarr store, skipped when a complete store made from files with
   the same SHA-256 already exists;
2. build the designs and write them as TSV;
3. fit the GLM on Dask and save the result (Zarr);
4. compute each contrast and write its maps (NIfTI, BIDS-derivatives names);
5. write a provenance JSON (configuration, versions, input checksums, timings).

Every output is written to a temporary name in its folder and renamed into place, and
each finished step is recorded in ``<outputs>/.bigglm/steps/<unit>/<step>.json`` with a
digest of the inputs it used. A run that is killed at any point (even SIGKILL) and started
again skips the recorded steps whose inputs are unchanged and produces identical
outputs. A lock per unit (``<outputs>/.bigglm/locks/<unit>.lock``) makes a second run on
the same outputs refuse to start instead of racing the first; locks left by dead
processes on this host are taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bigglm.bids import Run, find_runs, parse_entities
from bigglm.config import AnalysisConfig, RunInput
from bigglm.exceptions import ConfigError, DesignError, StoreError
from bigglm.report import environment, file_record, sha256_file, write_json_atomic
from bigglm.typing import ContrastKind, ProgressCallback

__all__ = [
    "UnitOutcome",
    "UnitPlan",
    "discover",
    "lock_units",
    "map_path",
    "plan",
    "run_analysis",
    "unit_folder",
]

logger = logging.getLogger(__name__)

#: Hidden folder of the step records and locks inside ``outputs.folder``.
STATE = ".bigglm"

#: ``progress_factory(description)`` returns a context manager yielding a callback.
ProgressFactory = Callable[[str], AbstractContextManager[ProgressCallback]]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


# --- the plan: what will be done, checked before any long work -------------------------------


@dataclass
class RunPlan:
    """One run, checked: its TR, length, design and where its store goes."""

    run: Run
    tr: float
    n_scans: int
    shape: tuple[int, int, int]
    affine: np.ndarray
    slice_time_ref: float
    store: Path
    design: pd.DataFrame


@dataclass
class UnitPlan:
    """The runs fitted together (one subject and task) and where their outputs go."""

    name: str
    runs: list[RunPlan]
    mask: Path | None
    folder: Path

    @property
    def subject(self) -> str:
        """The subject label shared by the unit's runs."""
        return self.runs[0].run.subject


@dataclass
class UnitOutcome:
    """What happened to one unit: steps run or reused, their timings, maps written."""

    name: str
    n_runs: int
    n_volumes: int
    n_voxels: int = 0
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    maps: list[Path] = field(default_factory=list)
    peaks: dict[str, float] = field(default_factory=dict)
    provenance: Path | None = None
    report: Path | None = None


def discover(config: AnalysisConfig, subjects: Sequence[str] | None = None) -> list[Run]:
    """The runs a configuration names, BIDS-discovered or explicit, optionally filtered.

    Parameters
    ----------
    config : AnalysisConfig
        A validated configuration.
    subjects : sequence of str, optional
        Keep only these subject labels (``bigglm run --subject``; array jobs).

    Returns
    -------
    list of Run
        The runs, with events, confounds, mask and TR where known.

    Raises
    ------
    ConfigError
        If nothing is found, or a subject filter matches no run.

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "/d/sub-02_task-x_bold.nii.gz"}]},
    ...                     "outputs": {"folder": "/o"}})
    >>> [(r.subject, r.task, r.name) for r in discover(cfg)]
    [('02', 'x', 'sub-02_task-x')]
    """
    inputs = config.inputs
    if inputs.bids is not None:
        b = inputs.bids
        runs = find_runs(
            b.derivatives,
            raw=b.raw,
            subjects=b.subjects,
            sessions=b.sessions,
            tasks=b.tasks,
            runs=b.runs,
            space=b.space,
        )
    else:
        runs = [_explicit_run(item, index) for index, item in enumerate(inputs.runs or [])]
    if inputs.mask is not None:
        runs = [_replace(r, mask=inputs.mask) for r in runs]
    if subjects:
        wanted = {s.removeprefix("sub-") for s in subjects}
        runs = [r for r in runs if r.subject in wanted]
        if not runs:
            raise ConfigError(f"--subject {', '.join(sorted(wanted))}: no run of these subjects")
    return runs


def _explicit_run(item: RunInput, index: int) -> Run:
    entities = {k: v for k, v in parse_entities(item.bold).items() if k != "suffix"}
    subject = item.subject or entities.get("sub") or "01"
    task = item.task or entities.get("task")
    if "sub" not in entities:
        entities = {"sub": subject, **({"task": task} if task else {}), "run": str(index + 1)}
    return Run(
        bold=item.bold,
        subject=subject,
        task=task,
        session=entities.get("ses"),
        run=entities.get("run"),
        events=item.events,
        confounds=item.confounds,
        mask=item.mask,
        tr=item.tr,
        entities=entities,
    )


def _replace(run: Run, **changes: Any) -> Run:
    from dataclasses import replace

    return replace(run, **changes)


def plan(config: AnalysisConfig, subjects: Sequence[str] | None = None) -> list[UnitPlan]:
    """Check a configuration against its inputs and plan the work, without reading voxel data.

    Reads NIfTI headers, events and confounds, builds every design, and checks that the
    runs of a unit share one grid, that TRs are known and that every contrast names real
    design columns.

    Parameters
    ----------
    config : AnalysisConfig
        A validated configuration.
    subjects : sequence of str, optional
        Only these subjects.

    Returns
    -------
    list of UnitPlan
        One per subject and task.

    Raises
    ------
    ConfigError
        For a missing file, unknown TR, grids that differ, or a contrast on no column.
    DesignError
        For bad events or confounds (the message names the file and row).

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "/nope/bold.nii.gz"}]},
    ...                     "outputs": {"folder": "/o"}})
    >>> plan(cfg)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.ConfigError: inputs: /nope/bold.nii.gz does not exist; check the path
    """
    runs = discover(config, subjects)
    names = [r.name for r in runs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(
            f"inputs: several runs are called {duplicated[0]!r}; give each run a distinct "
            "'subject'/'task' or BIDS file name"
        )
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.unit, []).append(r)
    return [_plan_unit(config, name, members) for name, members in groups.items()]


def _plan_unit(config: AnalysisConfig, name: str, runs: list[Run]) -> UnitPlan:
    planned = [_plan_run(config, r) for r in runs]
    first = planned[0]
    for other in planned[1:]:
        if other.shape != first.shape or not np.allclose(other.affine, first.affine, atol=1e-4):
            raise ConfigError(
                f"inputs: {other.run.bold.name} is not on the grid of {first.run.bold.name} "
                f"(shape {other.shape} vs {first.shape}); runs fitted together must be "
                "resampled to one grid"
            )
    masks = [p.run.mask for p in planned]
    for m in {m for m in masks if m is not None}:
        _check_mask(m, first)
    _check_contrasts(config, planned)
    unit_mask = masks[0] if len(set(masks)) == 1 else None
    return UnitPlan(name, planned, unit_mask, unit_folder(config, name))


def _plan_run(config: AnalysisConfig, run: Run) -> RunPlan:
    for path in (run.bold, run.events, run.confounds):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"inputs: {path} does not exist; check the path")
    shape, affine, n_scans, header_tr = _bold_header(run.bold)
    tr = run.tr if run.tr is not None else header_tr
    if tr is None:
        raise ConfigError(
            f"inputs: no TR for {run.bold.name} (no sidecar RepetitionTime, header pixdim[4] "
            "is 0); give 'tr' for this run"
        )
    if header_tr is not None and run.tr is not None and abs(header_tr - run.tr) > 1e-3 * run.tr:
        logger.warning(
            "%s: header TR %.4g s differs from the sidecar/config TR %.4g s; using %.4g s",
            run.bold.name,
            header_tr,
            run.tr,
            run.tr,
        )
    ref = _slice_time_ref(config, run, tr)
    design = _design(config, run, n_scans, tr, ref)
    store = config.store_folder / f"{run.name}_bold.zarr"
    return RunPlan(run, float(tr), n_scans, shape, affine, ref, store, design)


def _bold_header(path: Path) -> tuple[tuple[int, int, int], np.ndarray, int, float | None]:
    try:
        img: Any = nib.load(path)
    except Exception as err:  # nibabel raises many kinds for a bad file
        raise ConfigError(f"inputs: cannot read {path} as NIfTI ({err})") from None
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 4 or shape[3] < 2:
        raise ConfigError(f"inputs: {path} has shape {shape}; a run must be a 4D series")
    zooms = img.header.get_zooms()
    units = img.header.get_xyzt_units()[1]
    scale = {"msec": 1e-3, "usec": 1e-6}.get(units, 1.0)
    header_tr = float(zooms[3]) * scale if len(zooms) > 3 and zooms[3] > 0 else None
    return (shape[0], shape[1], shape[2]), np.asarray(img.affine), shape[3], header_tr


def _slice_time_ref(config: AnalysisConfig, run: Run, tr: float) -> float:
    if config.model.slice_time_ref is not None:
        return config.model.slice_time_ref
    if run.start_time is not None:
        return min(max(run.start_time / tr, 0.0), 1.0)
    return 0.0


def _design(config: AnalysisConfig, run: Run, n_scans: int, tr: float, ref: float) -> pd.DataFrame:
    from bigglm.design import make_run_design

    m = config.model
    columns = config.inputs.confounds
    try:
        return make_run_design(
            n_scans,
            tr,
            events=run.events,
            confounds=run.confounds if columns else None,
            confound_columns=columns or None,
            slice_time_ref=ref,
            hrf=m.hrf,
            drift=m.drift,
            high_pass=m.high_pass,
            drift_order=m.drift_order,
            fir_delays=m.fir_delays,
            oversampling=m.oversampling,
            min_onset=m.min_onset,
        )
    except DesignError as err:
        raise DesignError(f"{run.name}: {err}") from None


def _check_mask(mask: Path, run: RunPlan) -> None:
    if not mask.is_file():
        raise ConfigError(f"inputs: mask {mask} does not exist; check the path")
    img: Any = nib.load(mask)
    if tuple(img.shape[:3]) != run.shape:
        raise ConfigError(
            f"inputs: mask {mask.name} has shape {tuple(img.shape)} but {run.run.bold.name} "
            f"has volumes of shape {run.shape}; use a mask on the bold grid"
        )


def _check_contrasts(config: AnalysisConfig, runs: list[RunPlan]) -> None:
    from bigglm.contrasts import expression_to_vector

    for name, expression in config.contrasts.items():
        rows = [expression] if isinstance(expression, str) else expression
        for r in runs:
            columns = [str(c) for c in r.design.columns]
            for row in rows:
                try:
                    expression_to_vector(row, columns)
                except DesignError as err:
                    raise ConfigError(
                        f"contrasts.{name}: {err} (design of {r.run.name} has columns: "
                        f"{', '.join(columns)}){_closest(row, columns)}"
                    ) from None


def _closest(expression: str, columns: list[str]) -> str:
    import difflib

    for token in _IDENTIFIER.findall(expression):
        if token not in columns:
            close = difflib.get_close_matches(token, columns, n=1)
            if close:
                return f"; did you mean {close[0]!r} for {token!r}?"
    return ""


# --- step records: what is finished, with which inputs -------------------------------------


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _frame_digest(frame: pd.DataFrame) -> str:
    return hashlib.sha256(frame.to_csv(sep="\t", float_format="%.17g").encode()).hexdigest()


class _Steps:
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
        if finished:
            self.timings[step] = {"status": "reused", "seconds": stored.get("seconds", 0.0)}
            logger.info("%s: %s already done, skipped", self.folder.name, step)
        return finished

    @contextmanager
    def running(self, step: str, key: str) -> Iterator[None]:
        start = time.perf_counter()
        logger.info("%s: %s ...", self.folder.name, step)
        yield
        seconds = round(time.perf_counter() - start, 3)
        self.folder.mkdir(parents=True, exist_ok=True)
        finished = datetime.now(UTC).isoformat()
        write_json_atomic(
            self.folder / f"{step}.json", {"key": key, "seconds": seconds, "finished": finished}
        )
        self.timings[step] = {"status": "ran", "seconds": seconds}


# --- locks ----------------------------------------------------------------------------------


@contextmanager
def lock_units(outputs: str | Path, units: Sequence[str]) -> Iterator[None]:
    """Hold one lock file per unit in ``outputs`` for the duration of the block.

    A lock records the holder's host, PID and process start time. A lock whose process
    is gone (same host) is stale and taken over; any other existing lock makes this
    refuse, so two runs never write the same outputs at once.

    Parameters
    ----------
    outputs : str or Path
        The analysis output folder.
    units : sequence of str
        Unit names to lock (taken in sorted order, released on exit).

    Raises
    ------
    StoreError
        If another live process holds one of the locks.

    Examples
    --------
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> with lock_units(out, ["sub-01"]):
    ...     with lock_units(out, ["sub-01"]):
    ...         pass
    Traceback (most recent call last):
    ...
    bigglm.exceptions.StoreError: ...sub-01 is being written by another bigglm run (PID ...
    """
    folder = Path(outputs) / STATE / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        for unit in sorted(set(units)):
            stack.enter_context(_lock_file(folder / f"{unit}.lock", Path(outputs), unit))
        yield


@contextmanager
def _lock_file(path: Path, outputs: Path, unit: str) -> Iterator[None]:
    me = _holder()
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(me))
    try:
        for _ in range(2):
            try:
                os.link(temp, path)
                break
            except FileExistsError:
                holder = _read_holder(path)
                if holder is not None and _alive(holder):
                    raise StoreError(
                        f"{outputs}: {unit} is being written by another bigglm run (PID "
                        f"{holder.get('pid')} on {holder.get('host')}, since "
                        f"{holder.get('since')}); wait for it to finish or use another "
                        f"outputs.folder (if that run is dead, delete {path})"
                    ) from None
                logger.warning("taking over the stale lock %s (%s)", path, holder)
                path.unlink(missing_ok=True)
        else:  # pragma: no cover - lost a race twice
            raise StoreError(f"{path}: could not take the lock; try again")
    finally:
        temp.unlink(missing_ok=True)
    try:
        yield
    finally:
        if _read_holder(path) == me:
            path.unlink(missing_ok=True)


def _holder() -> dict[str, Any]:
    import psutil

    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "created": psutil.Process(pid).create_time(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether a lock's process still runs; locks from other hosts count as alive."""
    import psutil

    if holder.get("host") != socket.gethostname():
        return True
    try:
        process = psutil.Process(int(holder["pid"]))
        return abs(process.create_time() - float(holder["created"])) < 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False


# --- the steps -----------------------------------------------------------------------------


class _Checksums:
    """SHA-256 of input files, each computed once per process."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._known:
            self._known[key] = sha256_file(path)
        return self._known[key]


def _convert_step(
    unit: UnitPlan,
    rp: RunPlan,
    mask: Path | None,
    steps: _Steps,
    sums: _Checksums,
    config: AnalysisConfig,
    progress: ProgressFactory,
) -> None:
    from bigglm.io import convert

    mask_sum = sums(mask) if mask is not None else None
    key = _digest(sums(rp.run.bold), mask_sum, rp.tr, config.store.time_chunk)
    if _store_matches(rp, sums) and steps.done(f"convert-{rp.run.name}", key, [rp.store]):
        return
    rp.store.parent.mkdir(parents=True, exist_ok=True)
    _remove_partials(rp.store)
    with steps.running(f"convert-{rp.run.name}", key), progress(f"convert {rp.run.name}") as cb:
        convert(
            rp.run.bold,
            rp.store,
            mask=mask,
            tr=rp.tr,
            overwrite=True,
            time_chunk=config.store.time_chunk,
            progress=cb,
        )


def _store_matches(rp: RunPlan, sums: _Checksums) -> bool:
    """A complete store exists, made from a file with the same SHA-256 and the same TR."""
    from bigglm.io import open_run

    if not rp.store.exists():
        return False
    try:
        attrs = open_run(rp.store).attrs
    except StoreError:
        return False
    recorded = [s.get("sha256") for s in attrs.get("sources", [])]
    return recorded == [sums(rp.run.bold)] and abs(float(attrs.get("tr", 0)) - rp.tr) < 1e-9


def _remove_partials(store: Path) -> None:
    """Remove staging folders an interrupted conversion of this store left behind."""
    for partial in store.parent.glob(f".{store.name}.*"):
        shutil.rmtree(partial, ignore_errors=True)


def _remove_leftovers(unit: UnitPlan) -> None:
    """Delete temporary files a killed run of this unit left (we hold the unit's lock).

    Every output of the unit is named ``<unit>_...`` (maps, result store) or
    ``<run>_...`` (designs), and is written as a hidden ``.<name>...`` sibling first.
    """
    prefixes = (f".{unit.name}_", *(f".{rp.run.name}_" for rp in unit.runs))
    for leftover in unit.folder.iterdir():
        if leftover.name.startswith(prefixes):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _epi_mask(unit: UnitPlan, config: AnalysisConfig) -> Path:
    """The mask of the unit's first store as a NIfTI, so every run uses the same voxels."""
    from bigglm.io import open_run

    path = config.store_folder / f"{unit.name}_desc-epi_mask.nii.gz"
    if not path.exists():
        ds = open_run(unit.runs[0].store)
        _save_mask(path, np.asarray(ds["mask"].values), np.asarray(ds.attrs["affine"]))
    return path


def _intersection_mask(unit: UnitPlan, config: AnalysisConfig) -> Path:
    """The voxels inside every run's own brain mask (fMRIPrep writes one per run)."""
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
    if path.exists() and np.array_equal(np.asarray(_image(path).dataobj), data):
        return
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    nib.save(nib.Nifti1Image(data, affine.astype(float)), temp)
    os.replace(temp, path)


def _design_step(unit: UnitPlan, steps: _Steps) -> list[Path]:
    paths = [unit.folder / f"{rp.run.name}_design.tsv" for rp in unit.runs]
    key = _digest([_frame_digest(rp.design) for rp in unit.runs])
    if steps.done("designs", key, paths):
        return paths
    with steps.running("designs", key):
        for rp, path in zip(unit.runs, paths, strict=True):
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            rp.design.to_csv(temp, sep="\t", index=False, float_format="%.10g")
            os.replace(temp, path)
    return paths


def _fit_step(
    unit: UnitPlan,
    config: AnalysisConfig,
    steps: _Steps,
    sums: _Checksums,
    client: Any,
    progress: ProgressFactory,
) -> tuple[Any, str]:
    from bigglm.glm import GLMResult, fit
    from bigglm.io import open_run

    path = unit.folder / f"{unit.name}_glm.zarr"
    key = _digest(
        "fit",
        config.model.noise,
        [sums(rp.run.bold) for rp in unit.runs],
        [_frame_digest(rp.design) for rp in unit.runs],
        [str(rp.store) for rp in unit.runs],
    )
    if steps.done("fit", key, [path]):
        return GLMResult.from_zarr(path), key
    _remove_partials(path)
    with steps.running("fit", key), progress(f"fit {unit.name}") as callback:
        runs = [open_run(rp.store) for rp in unit.runs]
        designs = [rp.design for rp in unit.runs]
        result = fit(runs, designs, noise=config.model.noise, client=client)
        result.compute(progress=callback).to_zarr(path, overwrite=True)
    # Contrasts always come from the stored result, so a resumed run computes them from
    # exactly the same numbers as an uninterrupted one.
    return GLMResult.from_zarr(path), key


def unit_folder(config: AnalysisConfig, unit: str) -> Path:
    """The output folder of a unit: ``<outputs.folder>/sub-<label>``.

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "b.nii"}]}, "outputs": {"folder": "/o"}})
    >>> unit_folder(cfg, "sub-01_task-faces").as_posix()
    '/o/sub-01'
    """
    return config.outputs.folder / unit.split("_")[0]


def map_path(config: AnalysisConfig, unit: str, contrast: str, stat: str) -> Path:
    """Where a contrast's map is written (BIDS-derivatives name).

    Parameters
    ----------
    config : AnalysisConfig
        The analysis.
    unit : str
        The unit (``sub-<label>[_task-<label>]``).
    contrast : str
        The contrast's name in the config.
    stat : str
        ``effect``, ``variance``, ``stat``, ``p`` or ``z``.

    Returns
    -------
    Path

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "b.nii"}]}, "outputs": {"folder": "/o"}})
    >>> map_path(cfg, "sub-01_task-x", "faces_minus_houses", "z").name
    'sub-01_task-x_contrast-facesMinusHouses_stat-z_statmap.nii.gz'
    """
    label = _bids_label(contrast)
    return unit_folder(config, unit) / f"{unit}_contrast-{label}_stat-{stat}_statmap.nii.gz"


def _bids_label(name: str) -> str:
    """``faces_minus_houses`` -> ``facesMinusHouses`` (BIDS labels are alphanumeric).

    Examples
    --------
    >>> _bids_label("faces_minus_houses")
    'facesMinusHouses'
    """
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


#: Maps that exist for an F contrast (its effect is a vector per voxel).
_F_MAPS = ("stat", "p", "z")


def _maps_step(
    unit: UnitPlan,
    config: AnalysisConfig,
    result: Any,
    fit_key: str,
    steps: _Steps,
    outcome: UnitOutcome,
) -> None:
    from bigglm.io import to_nifti

    like = unit.runs[0].store
    for name, expression in config.contrasts.items():
        kind: ContrastKind = "t" if isinstance(expression, str) else "F"
        stats = [m for m in config.outputs.maps if kind == "t" or m in _F_MAPS]
        paths = {stat: map_path(config, unit.name, name, stat) for stat in stats}
        key = _digest(fit_key, expression, kind, sorted(paths))
        outcome.maps.extend(paths.values())
        if steps.done(f"contrast-{name}", key, list(paths.values())):
            if "z" in paths:
                outcome.peaks[name] = _peak(np.asarray(_image(paths["z"]).dataobj))
            continue
        with steps.running(f"contrast-{name}", key):
            values = result.contrast(expression, kind=kind)
            for stat, path in paths.items():
                to_nifti(values[stat], like, path)
        outcome.peaks[name] = _peak(np.asarray(values["z"]))


def _peak(z: np.ndarray) -> float:
    """The largest ``|z|`` (NaN when no voxel has a finite z)."""
    finite = np.abs(z[np.isfinite(z)])
    return float(finite.max()) if finite.size else float("nan")


def _provenance_step(
    unit: UnitPlan,
    config: AnalysisConfig,
    outcome: UnitOutcome,
    sums: _Checksums,
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
        "outputs": [str(p) for p in outcome.maps],
    }
    path = unit.folder / f"{unit.name}_provenance.json"
    return write_json_atomic(path, record)


# --- the whole workflow --------------------------------------------------------------------


def run_analysis(
    config: AnalysisConfig,
    *,
    subjects: Sequence[str] | None = None,
    client: Any = None,
    progress: ProgressFactory | None = None,
) -> list[UnitOutcome]:
    """Run a first-level analysis end to end, resuming whatever an earlier run finished.

    Parameters
    ----------
    config : AnalysisConfig
        A validated configuration.
    subjects : sequence of str, optional
        Only these subjects (the other units are left as they are).
    client : distributed.Client, optional
        The Dask client for the fit; default: one from ``config.cluster``.
    progress : callable, optional
        ``progress(description)`` returns a context manager yielding a ``(done, total)``
        callback (the CLI draws a bar with it).

    Returns
    -------
    list of UnitOutcome
        Per unit: steps run or reused, timings, the maps and provenance written.

    Raises
    ------
    ConfigError, DesignError
        From :func:`plan`, before any long work starts.
    StoreError
        If another run holds the outputs' lock, or a store cannot be written.

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "/nope.nii.gz"}]},
    ...                     "outputs": {"folder": "/tmp/o"}})
    >>> run_analysis(cfg)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.ConfigError: inputs: /nope.nii.gz does not exist; check the path
    """
    units = plan(config, subjects)
    outputs = config.outputs.folder
    outputs.mkdir(parents=True, exist_ok=True)
    factory: ProgressFactory = progress or (lambda description: nullcontext(_no_progress))
    with lock_units(outputs, [u.name for u in units]), _client(config, client) as active:
        return [_run_unit(u, config, active, factory) for u in units]


def _no_progress(done: int, total: int) -> None:
    """A progress callback that does nothing."""


@contextmanager
def _client(config: AnalysisConfig, client: Any) -> Iterator[Any]:
    if client is not None:
        yield client
        return
    from bigglm.cluster import client_from_profile

    with client_from_profile(config.cluster) as started:
        yield started


def _run_unit(
    unit: UnitPlan, config: AnalysisConfig, client: Any, progress: ProgressFactory
) -> UnitOutcome:
    from bigglm.io import open_run

    started = datetime.now(UTC).isoformat()
    outcome = UnitOutcome(unit.name, len(unit.runs), sum(rp.n_scans for rp in unit.runs))
    steps = _Steps(config.outputs.folder, unit.name)
    sums = _Checksums()
    unit.folder.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(unit)
    mask = unit.mask
    if mask is None and all(rp.run.mask is not None for rp in unit.runs):
        mask = _intersection_mask(unit, config)
    for index, rp in enumerate(unit.runs):
        _convert_step(unit, rp, mask, steps, sums, config, progress)
        if mask is None and index == 0 and len(unit.runs) > 1:
            mask = _epi_mask(unit, config)
    _design_step(unit, steps)
    result, fit_key = _fit_step(unit, config, steps, sums, client, progress)
    outcome.n_voxels = int(open_run(unit.runs[0].store).sizes["voxel"])
    _maps_step(unit, config, result, fit_key, steps, outcome)
    outcome.steps = dict(steps.timings)
    outcome.provenance = _provenance_step(unit, config, outcome, sums, started)
    if config.outputs.report:
        outcome.report = _report_step(unit, config, outcome)
    return outcome


def _report_step(unit: UnitPlan, config: AnalysisConfig, outcome: UnitOutcome) -> Path:
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
    return write_html_report(
        unit.folder / f"{unit.name}_report.html",
        title=unit.name,
        designs={rp.run.name: rp.design for rp in unit.runs},
        z_maps=z_maps,
        steps=outcome.steps,
        facts=facts,
    )


# --- bigglm fit: stores and files from the command line, no YAML ------------------------------


def parse_contrast_options(options: Sequence[str]) -> dict[str, str | list[str]]:
    """``["name=expr", "F=a;b"]`` -> ``{"name": "expr", "F": ["a", "b"]}`` (``;`` makes F).

    Parameters
    ----------
    options : sequence of str
        ``NAME=EXPRESSION`` items; rows separated by ``;`` make an F contrast.

    Returns
    -------
    dict

    Raises
    ------
    ConfigError
        For an item without ``=`` or with an empty name.

    Examples
    --------
    >>> parse_contrast_options(["d=faces - houses", "any=faces; houses"])
    {'d': 'faces - houses', 'any': ['faces', 'houses']}
    """
    out: dict[str, str | list[str]] = {}
    for option in options:
        name, sep, expression = option.partition("=")
        if not sep or not name.strip() or not expression.strip():
            raise ConfigError(
                f"--contrast {option!r}: write NAME=EXPRESSION, e.g. "
                "--contrast 'faces_minus_houses=faces - houses'"
            )
        rows = [row.strip() for row in expression.split(";") if row.strip()]
        out[name.strip()] = rows[0] if len(rows) == 1 else rows
    return out


def _per_store(values: Sequence[Path] | None, n: int, option: str) -> list[Path | None]:
    if not values:
        return [None] * n
    if len(values) != n:
        raise ConfigError(f"{option}: got {len(values)} files for {n} stores; give one per store")
    return list(values)


def fit_stores(
    stores: Sequence[Path],
    output: Path,
    *,
    events: Sequence[Path] | None = None,
    confounds: Sequence[Path] | None = None,
    confound_columns: Sequence[str] | None = None,
    contrasts: Sequence[str] = (),
    noise: str = "ar1",
    hrf: str = "glover",
    drift: str | None = "cosine",
    high_pass: float = 0.01,
    slice_time_ref: float = 0.0,
    address: str | None = None,
) -> list[Path]:
    """Fit converted stores (one subject's runs) and write each contrast's maps.

    The ``bigglm fit`` command: designs are built from the stores' TR and length and the
    given events and confounds, the runs are fitted together, and for every contrast the
    effect, variance, stat and z maps (stat and z for F) are written to ``output``, with
    the result store ``glm.zarr``.

    Parameters
    ----------
    stores : sequence of Path
        Stores from :func:`bigglm.convert`, all on one grid.
    output : Path
        Folder for the maps (created).
    events, confounds : sequence of Path, optional
        One file per store.
    confound_columns : sequence of str, optional
        Confound columns (names or globs); all when omitted.
    contrasts : sequence of str
        ``NAME=EXPRESSION`` items (see :func:`parse_contrast_options`).
    noise, hrf, drift, high_pass, slice_time_ref
        As in the YAML ``model`` section (``drift="none"``: no drift terms).
    address : str, optional
        A Dask scheduler; default a local cluster sized to the machine.

    Returns
    -------
    list of Path
        The maps written.

    Raises
    ------
    ConfigError, DesignError, StoreError
        For bad options, files or stores.

    Examples
    --------
    >>> fit_stores([Path("/nope.zarr")], Path("/tmp/o"), contrasts=["a"])
    Traceback (most recent call last):
    ...
    bigglm.exceptions.ConfigError: --contrast 'a': write NAME=EXPRESSION, ...
    """
    from bigglm.cluster import client_from_profile
    from bigglm.config import ClusterConfig, ModelConfig
    from bigglm.design import make_run_design
    from bigglm.glm import fit
    from bigglm.io import open_run, to_nifti

    named = parse_contrast_options(contrasts)
    try:
        model = ModelConfig.model_validate(
            {"noise": noise, "hrf": hrf, "drift": None if drift == "none" else drift}
        )
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[-1].strip()) from None
    runs = [open_run(s) for s in stores]
    event_files = _per_store(events, len(runs), "--events")
    confound_files = _per_store(confounds, len(runs), "--confounds")
    designs = [
        make_run_design(
            ds.sizes["time"],
            float(ds.attrs["tr"]),
            events=ev,
            confounds=cf,
            confound_columns=confound_columns,
            slice_time_ref=slice_time_ref,
            hrf=model.hrf,
            drift=model.drift,
            high_pass=high_pass,
        )
        for ds, ev, cf in zip(runs, event_files, confound_files, strict=True)
    ]
    profile = ClusterConfig(profile="address", address=address) if address else ClusterConfig()
    output.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with client_from_profile(profile) as client:
        result = fit(runs, designs, noise=model.noise, client=client).compute()
    result.to_zarr(output / "glm.zarr", overwrite=True)
    for name, expression in named.items():
        kind: ContrastKind = "t" if isinstance(expression, str) else "F"
        values = result.contrast(expression, kind=kind)
        for stat in ("effect", "variance", "stat", "z") if kind == "t" else _F_MAPS:
            path = output / f"contrast-{_bids_label(name)}_stat-{stat}_statmap.nii.gz"
            written.append(to_nifti(values[stat], stores[0], path))
    return written
