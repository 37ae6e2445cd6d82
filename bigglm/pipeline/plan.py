"""Plan an analysis: find its runs, group them into units, check every input cheaply.

Nothing here reads voxel data: NIfTI and CIFTI-2 headers, events, confounds and masks
are enough to catch a bad configuration in seconds, before any long work. (A GIFTI
series has no header apart from its data: its files are parsed to count time points.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bigglm.bids import Run, find_runs, parse_entities
from bigglm.config import AnalysisConfig, RunInput
from bigglm.design.options import check_tr
from bigglm.exceptions import (
    BigGLMWarning,
    ConfigError,
    DesignError,
    StoreError,
    not_a_regular_file,
)
from bigglm.glm.noise import check_fit_size, noise_order
from bigglm.io.artefacts import check_outside_stores

__all__ = [
    "STATE",
    "RunPlan",
    "UnitPlan",
    "discover",
    "map_path",
    "map_paths",
    "plan",
    "state_folder",
    "unit_folder",
]

logger = logging.getLogger(__name__)

#: Hidden folder of the step records, locks and job scripts inside ``outputs.folder``.
STATE = ".bigglm"


def state_folder(outputs: str | os.PathLike[str]) -> Path:
    """``outputs/.bigglm``, created readable by the user only (mode 0700).

    Parameters
    ----------
    outputs : path
        The outputs folder of an analysis (created if missing).

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import tempfile
    >>> oct(state_folder(tempfile.mkdtemp()).stat().st_mode & 0o777)
    '0o700'
    """
    from bigglm.security import private_folder

    return private_folder(Path(outputs) / STATE)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclass
class RunPlan:
    """One run, checked: its TR, length, design and where its store goes.

    ``shape`` is the volume's shape, a GIFTI run's vertices per hemisphere, or a CIFTI-2
    run's grayordinates; ``affine`` is None for surface runs.
    """

    run: Run
    tr: float
    n_scans: int
    shape: tuple[int, ...]
    affine: np.ndarray | None
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

    @property
    def geometry(self) -> str:
        """``voxel``, ``vertex`` (GIFTI) or ``grayordinate`` (CIFTI-2): the runs' columns."""
        return self.runs[0].run.geometry

    @property
    def map_prefix(self) -> str:
        """The BIDS entities of the unit's maps: its name, plus the space of surface runs
        (``sub-01_task-x_space-fsaverage5``; volume maps are named by the unit alone)."""
        return "_".join([self.name, *_surface_entities(self.runs[0].run)])


def _surface_entities(run: Run) -> list[str]:
    """``space-<label>`` and ``den-<label>`` of a surface run; none for a volume run."""
    if run.geometry == "voxel":
        return []
    return [f"{key}-{run.entities[key]}" for key in ("space", "den") if key in run.entities]


def discover(config: AnalysisConfig, subjects: Sequence[str] | None = None) -> list[Run]:
    """The runs a configuration names, BIDS-discovered or explicit, optionally filtered.

    Parameters
    ----------
    config : AnalysisConfig
        A validated configuration.
    subjects : sequence of str, optional
        Keep only these subject labels (the array jobs of :func:`bigglm.batch.submit`).

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
            labels = ", ".join(sorted(wanted))
            raise ConfigError(f"subjects {labels}: no run of these subjects; check the labels")
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
    _check_output_folders(config)
    runs = discover(config, subjects)
    names = [r.name for r in runs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(
            f"inputs: several runs are called {duplicated[0]!r}; give each run a distinct "
            "'subject'/'task' or BIDS file name"
        )
    _check_confounds(config, runs)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.unit, []).append(r)
    return [_plan_unit(config, name, members) for name, members in groups.items()]


def _check_confounds(config: AnalysisConfig, runs: list[Run]) -> None:
    """Requested confounds need a confounds file for every run (or an explicit opt-out)."""
    if not config.inputs.confounds:
        return
    lacking = [r for r in runs if r.confounds is None]
    if not lacking:
        return
    names = ", ".join(r.name for r in lacking)
    if not config.inputs.confounds_required:
        warnings.warn(
            f"inputs.confounds: no confounds file for {names}; these runs are fitted "
            "without confounds ('confounds_required: false')",
            BigGLMWarning,
            stacklevel=3,
        )
        return
    where = (
        f"no *_desc-confounds_timeseries.tsv beside {lacking[0].bold}"
        if config.inputs.bids is not None
        else "no 'confounds' file given in inputs.runs"
    )
    raise ConfigError(
        f"inputs.confounds: {config.inputs.confounds} requested, but {len(lacking)} run(s) "
        f"have no confounds file ({names}; {where}); add the files, or set "
        "'confounds_required: false' to fit those runs without confounds"
    )


def _check_output_folders(config: AnalysisConfig) -> None:
    """Refuse an outputs or store folder that is, or is inside, something not a folder,
    or a Zarr store (the workflow's files made there became part of the store)."""
    for key, folder in (
        ("outputs.folder", config.outputs.folder),
        ("store.folder", config.store_folder),
    ):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(
                f"{key}: {existing} exists and is not a folder; choose another path "
                "or move the file"
            )
        try:
            check_outside_stores(folder / "x")
        except StoreError as err:
            raise ConfigError(f"{key}: {folder} {str(err).split(': ', 1)[1]}") from None


def _plan_unit(config: AnalysisConfig, name: str, runs: list[Run]) -> UnitPlan:
    planned = [_plan_run(config, r) for r in runs]
    first = planned[0]
    for other in planned[1:]:
        if other.run.geometry != first.run.geometry:
            raise ConfigError(
                f"inputs: {other.run.bold.name} ({other.run.geometry} columns) and "
                f"{first.run.bold.name} ({first.run.geometry} columns) are fitted together; "
                "runs fitted together must be in one space"
            )
        if other.shape != first.shape or not _same_affine(other.affine, first.affine):
            raise ConfigError(
                f"inputs: {other.run.bold.name} is not on the grid of {first.run.bold.name} "
                f"(shape {other.shape} vs {first.shape}); runs fitted together must be "
                "resampled to one grid"
            )
    masks = [p.run.mask for p in planned]
    if first.affine is None and any(m is not None for m in masks):
        raise ConfigError(
            f"inputs: a mask is given for {first.run.bold.name}, a surface run; surface runs "
            "take their own vertices (GIFTI: those varying over time; CIFTI-2: its brain "
            "models): leave 'mask' out"
        )
    if first.affine is None and config.outputs.residuals is not None:
        raise ConfigError(
            f"outputs.residuals: {first.run.bold.name} is a surface run, and bigglm writes "
            "residuals of volume runs only (on their voxel grid); leave 'residuals' out"
        )
    for m in sorted({m for m in masks if m is not None}):
        _check_mask(m, first)
    _check_contrasts(config, planned)
    unit_mask = masks[0] if len(set(masks)) == 1 else None
    return UnitPlan(name, planned, unit_mask, unit_folder(config, name))


def _same_affine(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.allclose(a, b, atol=1e-4))


def _plan_run(config: AnalysisConfig, run: Run) -> RunPlan:
    for path in (*run.files, run.events, run.confounds):
        problem = None if path is None else not_a_regular_file(path)
        if problem:
            raise ConfigError(f"inputs: {path} {problem}; check the path")
    shape, affine, n_scans, header_tr = _series_header(run)
    tr = run.tr if run.tr is not None else header_tr
    if tr is None and run.geometry == "vertex":
        raise ConfigError(
            f"inputs: no TR for {run.bold.name}: its JSON sidecar (or the raw bold's) has no "
            "RepetitionTime, and a GIFTI series records none bigglm trusts; add "
            "RepetitionTime (seconds) to the sidecar"
        )
    if tr is None:
        raise ConfigError(
            f"inputs: no TR for {run.bold.name} (no sidecar RepetitionTime, header pixdim[4] "
            "is 0); give 'tr' for this run"
        )
    try:
        tr = check_tr(tr)
    except DesignError as err:
        raise ConfigError(
            f"inputs: {run.bold.name}: {err}; check the sidecar's RepetitionTime or the run's 'tr'"
        ) from None
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
    order = noise_order(config.model.noise)
    try:
        check_fit_size(n_scans, design.shape[1], order, run.name)
    except DesignError as err:
        raise ConfigError(f"model: {err}") from None
    store = config.store_folder / store_name(config, run)
    return RunPlan(run, float(tr), n_scans, shape, affine, ref, store, design)


def store_name(config: AnalysisConfig, run: Run) -> str:
    """The name of a run's store in ``store.folder``.

    A mask the config gives (``inputs.mask``, or a run's ``mask``) is part of the name
    (``<run>_mask-<digest of its path>_bold.zarr``): two analyses sharing a store folder
    with different masks would otherwise convert the same run, on different voxels, to
    one path, each replacing the store the other is reading.
    """
    given = config.inputs.mask is not None or config.inputs.runs is not None
    if run.geometry != "voxel":  # the space in the name: a volume run's store is another
        return "_".join([run.name, *_surface_entities(run), "bold.zarr"])
    if run.mask is None or not given:
        return f"{run.name}_bold.zarr"
    digest = hashlib.sha256(str(Path(run.mask).resolve()).encode()).hexdigest()[:8]
    return f"{run.name}_mask-{digest}_bold.zarr"


def _series_header(run: Run) -> tuple[tuple[int, ...], np.ndarray | None, int, float | None]:
    """Shape, affine (None on surfaces), time points and header TR of a run's series."""
    if run.geometry == "vertex":
        return _gifti_header(run)
    if run.geometry == "grayordinate":
        return _cifti_header(run.bold, run.tr)
    return _bold_header(run.bold)


def _gifti_header(run: Run) -> tuple[tuple[int, ...], None, int, None]:
    """Vertices per hemisphere and time points of a GIFTI run, both files read and
    checked as :func:`bigglm.convert` checks them (one run, time points in each)."""
    from bigglm.io.gifti import read_hemispheres

    if run.right is None:
        raise ConfigError(
            f"inputs: {run.bold.name} is one hemisphere's GIFTI series; the workflow fits "
            "both hemispheres of a run, paired by BIDS discovery: give 'bids' inputs with "
            "the surface 'space' (e.g. fsaverage5)"
        )
    try:
        series = read_hemispheres({"L": run.bold, "R": run.right})
    except StoreError as err:
        raise ConfigError(f"inputs: {err}") from None
    return tuple(s.n_vertices for s in series), None, series[0].n_volumes, None


def _cifti_header(path: Path, tr: float | None) -> tuple[tuple[int, ...], None, int, float | None]:
    """Grayordinates, time points and series step (in seconds, else None) of a CIFTI-2
    dense series; ``tr`` (the sidecar's) stands in for a step not in seconds."""
    from bigglm.io.cifti import inspect_dtseries

    try:
        series = inspect_dtseries(path, tr=tr)
    except StoreError as err:
        raise ConfigError(f"inputs: {err}") from None
    axis = series.series
    step = float(axis.step) if axis.unit == "SECOND" and axis.step > 0 else None
    return (series.n_grayordinates,), None, series.n_volumes, step


def _bold_header(path: Path) -> tuple[tuple[int, ...], np.ndarray, int, float | None]:
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
            slice_time_ref=ref if m.convention == "nilearn" else 0.0,
            **m.design_options(),
        )
    except DesignError as err:
        raise DesignError(f"{run.name}: {err}") from None


def _check_mask(mask: Path, run: RunPlan) -> None:
    problem = not_a_regular_file(mask)
    if problem:
        raise ConfigError(f"inputs: mask {mask} {problem}; check the path")
    try:
        img: Any = nib.load(mask)
    except Exception as err:  # nibabel raises many kinds for a bad file
        raise ConfigError(f"inputs: cannot read mask {mask} as NIfTI ({err})") from None
    if tuple(img.shape[:3]) != run.shape:
        raise ConfigError(
            f"inputs: mask {mask.name} has shape {tuple(img.shape)} but {run.run.bold.name} "
            f"has volumes of shape {run.shape}; use a mask on the bold grid"
        )
    if not _same_affine(np.asarray(img.affine), run.affine):
        raise ConfigError(
            f"inputs: mask {mask.name} has another affine than {run.run.bold.name} (another "
            "position or voxel size on the same shape); use a mask on the bold grid"
        )


def _check_contrasts(config: AnalysisConfig, runs: list[RunPlan]) -> None:
    """Parse every contrast against every run's design, as the fit will, and check it is
    estimable there: unknown columns, F rows that are linearly dependent and contrasts the
    design cannot estimate are reported now, not after the conversion."""
    from bigglm.glm import contrasts as con

    for name, spec in config.contrasts.items():
        for r in runs:
            columns = [str(c) for c in r.design.columns]
            try:
                con.estimable_contrast(spec, r.design.to_numpy(np.float64), columns)
            except DesignError as err:
                rows = [spec] if isinstance(spec, str) else spec
                raise ConfigError(
                    f"contrasts.{name}: {err} (design of {r.run.name} has columns: "
                    f"{', '.join(columns)}){_closest(' '.join(rows), columns)}"
                ) from None


def _closest(expression: str, columns: list[str]) -> str:
    import difflib

    for token in _IDENTIFIER.findall(expression):
        if token not in columns:
            close = difflib.get_close_matches(token, columns, n=1)
            if close:
                return f"; did you mean {close[0]!r} for {token!r}?"
    return ""


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

    Named by :func:`bigglm.glm.contrasts.map_file_name`, as the Python API names them:
    the test statistic's map is ``stat-t`` or ``stat-F`` by the contrast's kind.

    Parameters
    ----------
    config : AnalysisConfig
        The analysis.
    unit : str
        The unit (``sub-<label>[_task-<label>]``).
    contrast : str
        The contrast's name in the config.
    stat : str
        A name of ``outputs.maps``: ``effect``, ``variance``, ``stat`` (the contrast's t
        or F), ``p`` or ``z``.

    Returns
    -------
    Path

    Raises
    ------
    ConfigError
        For ``stat="stat"`` and a contrast the configuration does not have.
    DesignError
        For ``t`` asked of an F contrast, or ``F`` of a t contrast.

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "b.nii"}]}, "outputs": {"folder": "/o"},
    ...                     "contrasts": {"fh": "faces - houses", "any": ["faces", "houses"]}})
    >>> map_path(cfg, "sub-01_task-x", "fh", "z").name
    'sub-01_task-x_contrast-fh_stat-z_statmap.nii.gz'
    >>> map_path(cfg, "sub-01_task-x", "fh", "stat").name
    'sub-01_task-x_contrast-fh_stat-t_statmap.nii.gz'
    >>> map_path(cfg, "sub-01_task-x", "any", "stat").name
    'sub-01_task-x_contrast-any_stat-F_statmap.nii.gz'
    """
    from bigglm.glm.contrasts import label, map_file_name

    name = map_file_name(unit, label(contrast), _stat_name(config, contrast, stat))
    return unit_folder(config, unit) / name


def _stat_name(config: AnalysisConfig, contrast: str, stat: str) -> str:
    """A map's statistic as its file names it: ``stat`` is ``t`` or ``F`` by its kind."""
    from bigglm.glm.contrasts import default_kind, map_stat

    if contrast in config.contrasts:
        return map_stat(stat, default_kind(config.contrasts[contrast]))
    if stat == "stat":
        raise ConfigError(
            f"contrasts: no contrast {contrast!r} in the configuration, so the kind of its "
            f"statistic is unknown; use one of {', '.join(config.contrasts) or 'none'}"
        )
    return stat


def map_paths(config: AnalysisConfig, unit: UnitPlan, contrast: str, stat: str) -> list[Path]:
    """The files of a contrast's map for a unit: :func:`map_path` for volume runs; for
    surface runs, GIFTI files per hemisphere or one CIFTI-2 dense scalar file, named with
    the runs' space (:func:`bigglm.glm.persistence.map_paths`).

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "b.nii"}]}, "outputs": {"folder": "/o"},
    ...                     "contrasts": {"a": "a"}})
    >>> bold = Path("/d/sub-01_task-x_space-fsLR_den-91k_bold.dtseries.nii")
    >>> run = Run(bold, task="x", entities=parse_entities(bold))
    >>> unit = UnitPlan("sub-01_task-x", [RunPlan(run, 2.0, 10, (5,), None, 0.0, bold,
    ...                                           pd.DataFrame())], None, Path("/o/sub-01"))
    >>> [p.name for p in map_paths(cfg, unit, "a", "stat")]
    ['sub-01_task-x_space-fsLR_den-91k_contrast-a_stat-t_statmap.dscalar.nii']
    """
    from bigglm.glm import persistence
    from bigglm.glm.contrasts import label

    if unit.geometry == "voxel":
        return [map_path(config, unit.name, contrast, stat)]
    return persistence.map_paths(
        unit.folder,
        unit.map_prefix,
        label(contrast),
        _stat_name(config, contrast, stat),
        geometry=unit.geometry,
        hemis=["L", "R"],
    )
