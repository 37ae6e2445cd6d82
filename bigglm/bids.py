"""Find the runs of a BIDS derivatives dataset (fMRIPrep layout) and the files that go with them.

For every ``sub-*/[ses-*/]func/*_desc-preproc_bold.nii[.gz]`` under the derivatives
folder, :func:`find_runs` finds by entity:

- the brain mask ``*_desc-brain_mask.nii[.gz]`` (same entities, same space);
- the confounds ``*_desc-confounds_timeseries.tsv`` (or fMRIPrep < 20.2's
  ``*_desc-confounds_regressors.tsv``), which carry no ``space``;
- the events ``*_events.tsv`` next to the raw bold (``raw`` folder, the dataset root), else
  in the derivatives, else inherited from the root (``task-<label>_events.tsv``);
- the repetition time and slice-timing reference time (``RepetitionTime``, ``StartTime``)
  from the JSON sidecar of the preprocessed bold, else of the raw bold, else inherited.

When ``space`` names a surface space, the runs are fMRIPrep's surface outputs instead:
GIFTI series ``*_hemi-L_space-<space>_bold.func.gii`` (either entity order), paired with
the same run's ``hemi-R`` file into one run, or CIFTI-2 dense series
``*_space-<space>[_den-<label>]_bold.dtseries.nii``. Without ``space``, only volumes
are looked for. Surface runs have no brain mask (their series bring their own vertices).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigglm.exceptions import ConfigError

__all__ = ["Run", "find_runs", "map_prefix", "parse_entities"]

logger = logging.getLogger(__name__)

#: The order BIDS gives entities in a file name (``hemi`` before ``space``).
_ORDER = (
    "sub",
    "ses",
    "task",
    "acq",
    "ce",
    "rec",
    "dir",
    "run",
    "echo",
    "hemi",
    "space",
    "res",
    "den",
    "desc",
)
_PREPROC = "desc-preproc_bold"
#: fMRIPrep's surface series: GIFTI (one file per hemisphere) and CIFTI-2.
_GIFTI, _CIFTI = "_bold.func.gii", "_bold.dtseries.nii"
_CONFOUNDS = ("desc-confounds_timeseries.tsv", "desc-confounds_regressors.tsv")


@dataclass(frozen=True)
class Run:
    """One functional run and the files that go with it.

    Attributes
    ----------
    bold : Path
        The (preprocessed) 4D series; for a GIFTI run, the left hemisphere's series.
    right : Path or None
        For a GIFTI run, the right hemisphere's series of the same run.
    subject, task, session, run : str or None
        BIDS labels (without the ``sub-`` etc. prefixes).
    events, confounds, mask : Path or None
        The matching files, when found or given.
    tr : float or None
        Repetition time in seconds (sidecar or config); ``None``: read the NIfTI header
        (or the CIFTI-2 series axis).
    start_time : float or None
        ``StartTime`` from the sidecar: the acquisition time of the reference slice.
    """

    bold: Path
    subject: str = "01"
    task: str | None = None
    session: str | None = None
    run: str | None = None
    events: Path | None = None
    confounds: Path | None = None
    mask: Path | None = None
    tr: float | None = None
    start_time: float | None = None
    entities: dict[str, str] = field(default_factory=dict, compare=False)
    right: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """The run's series files: the bold, or the left and right GIFTI series."""
        return (self.bold,) if self.right is None else (self.bold, self.right)

    @property
    def geometry(self) -> str:
        """What the series' columns are, by its file name: ``voxel``, ``vertex`` (GIFTI)
        or ``grayordinate`` (CIFTI-2), the geometry its store will have."""
        name = self.bold.name.lower()
        if name.endswith(".gii"):
            return "vertex"
        return "grayordinate" if name.endswith(".dtseries.nii") else "voxel"

    @property
    def unit(self) -> str:
        """The group of runs fitted together: ``sub-<label>[_task-<label>]``."""
        return f"sub-{self.subject}" + (f"_task-{self.task}" if self.task else "")

    @property
    def name(self) -> str:
        """A file-name stem unique to this run (BIDS entities, or the bold file's stem)."""
        keys = [
            k for k in ("sub", "ses", "task", "acq", "dir", "run", "echo") if k in self.entities
        ]
        if keys:
            return "_".join(f"{k}-{self.entities[k]}" for k in keys)
        return _stem(self.bold)


def parse_entities(path: str | Path) -> dict[str, str]:
    """The ``key-value`` entities of a BIDS file name, plus its ``suffix``.

    Parameters
    ----------
    path : str or Path
        A BIDS file name or path.

    Returns
    -------
    dict
        Entities in file-name order; the last bare part is stored under ``"suffix"``.

    Examples
    --------
    >>> parse_entities("sub-01_ses-2_task-faces_run-1_desc-preproc_bold.nii.gz")
    {'sub': '01', 'ses': '2', 'task': 'faces', 'run': '1', 'desc': 'preproc', 'suffix': 'bold'}
    """
    entities: dict[str, str] = {}
    for part in _stem(Path(path)).split("_"):
        key, sep, value = part.partition("-")
        if sep:
            entities[key] = value
        else:
            entities["suffix"] = part
    return entities


#: Entities of one run that runs fitted together do not share in their maps.
_RUN_LEVEL = ("run",)


def map_prefix(runs: Sequence[Sequence[str | Path]]) -> str | None:
    """The BIDS entities of the maps of runs fitted together, from their bold file names.

    A run's entities are those of its BIDS-named bold file, everything before the
    ``_bold`` suffix, less ``desc`` (it describes the bold's preprocessing, not the map;
    nilearn's ``save_glm_to_bids`` drops it too). Several runs fitted together keep the
    entities all of them share with one value, and never the run-level ``run``: runs
    ``sub-01_ses-2_task-faces_run-1_bold`` and ``..._run-2_bold`` give
    ``sub-01_ses-2_task-faces``, and runs of sessions 1 and 2 give ``sub-01_task-faces``.

    Parameters
    ----------
    runs : sequence of sequences of path
        Per run, its source files (one 4D file, or its 3D volumes), as
        :func:`bigglm.convert` records them in a store's ``sources`` attribute.

    Returns
    -------
    str or None
        The entities (``"sub-01_ses-2_task-faces_run-1"``); None when a source is not a
        BIDS-named bold file (``sub-<label>[_<key>-<label>...]_bold.nii[.gz]``), when the
        sources of one run disagree, or when no run is given.

    Examples
    --------
    >>> map_prefix([["/d/sub-01_ses-2_task-faces_run-1_desc-preproc_bold.nii.gz"]])
    'sub-01_ses-2_task-faces_run-1'
    >>> map_prefix([["sub-01_ses-1_task-x_run-1_bold.nii"], ["sub-01_ses-2_task-x_run-1_bold.nii"]])
    'sub-01_task-x'
    >>> map_prefix([["bold.nii.gz"]]) is None
    True
    """
    per_run = [_run_entities(sources) for sources in runs]
    if not per_run or any(e is None for e in per_run):
        return None
    first, *others = [e for e in per_run if e is not None]
    shared = {k: v for k, v in first.items() if all(o.get(k) == v for o in others)}
    drop = ("desc", *_RUN_LEVEL) if others else ("desc",)
    return _prefix(shared, drop=drop)


def _run_entities(sources: Sequence[str | Path]) -> dict[str, str] | None:
    """The entities of a run whose sources all have one BIDS bold name, else None."""
    found = [_bold_entities(Path(source)) for source in sources]
    if not found or found[0] is None or any(e != found[0] for e in found[1:]):
        return None
    return found[0]


def _bold_entities(path: Path) -> dict[str, str] | None:
    """The entities of ``sub-<label>[_<key>-<label>...]_bold.nii[.gz]``, else None."""
    if not path.name.endswith((".nii", ".nii.gz")):
        return None
    *parts, suffix = _stem(path).split("_")
    pairs = [part.partition("-") for part in parts]
    if suffix != "bold" or not pairs or pairs[0][0] != "sub":
        return None
    if not all(key.isalnum() and sep and value.isalnum() for key, sep, value in pairs):
        return None
    keys = [key for key, _, _ in pairs]
    if len(set(keys)) != len(keys):
        return None
    return {key: value for key, _, value in pairs}


def find_runs(
    derivatives: str | Path,
    *,
    raw: str | Path | None = None,
    subjects: Sequence[str] | None = None,
    sessions: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    runs: Sequence[str] | None = None,
    space: str | None = None,
) -> list[Run]:
    """Discover the preprocessed runs of an fMRIPrep derivatives folder.

    Parameters
    ----------
    derivatives : str or Path
        The fMRIPrep output folder (holding ``sub-*`` folders).
    raw : str or Path, optional
        The raw BIDS dataset root, where ``*_events.tsv`` and raw sidecars live.
    subjects, sessions, tasks : sequence of str, optional
        Labels to keep (without prefixes); ``None`` keeps all.
    runs : sequence of str, optional
        Run indices to keep, compared as integers (``"1"`` matches ``run-01``).
    space : str, optional
        Output space to keep (e.g. ``"MNI152NLin2009cAsym"``); needed when several exist.

    Returns
    -------
    list of Run
        Sorted by subject, session, task, run.

    Raises
    ------
    ConfigError
        If the folder is missing, nothing matches the filters, a run has no TR, or
        several spaces are present and ``space`` is not set.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> func = root / "sub-01" / "func"; func.mkdir(parents=True)
    >>> _ = (func / "sub-01_task-a_desc-preproc_bold.nii.gz").write_bytes(b"")
    >>> _ = (func / "sub-01_task-a_desc-preproc_bold.json").write_text('{"RepetitionTime": 2}')
    >>> [(r.subject, r.task, r.tr) for r in find_runs(root)]
    [('01', 'a', 2.0)]
    """
    root = Path(derivatives)
    if not root.is_dir():
        raise ConfigError(
            f"inputs.bids.derivatives: {root} is not a folder; give fMRIPrep's output folder"
        )
    raw_root = Path(raw) if raw is not None else None
    if raw_root is not None and not raw_root.is_dir():
        raise ConfigError(f"inputs.bids.raw: {raw_root} is not a folder; give the raw BIDS root")
    patterns = [f"*_{_PREPROC}.nii*"] + ([f"*{_GIFTI}", f"*{_CIFTI}"] if space else [])
    candidates = [
        path
        for pattern in patterns
        for folder in ("sub-*/func", "sub-*/ses-*/func")
        for path in sorted(root.glob(f"{folder}/{pattern}"))
    ]
    wanted = _filters(subjects, sessions, tasks, runs)
    found = [p for p in candidates if _keep(parse_entities(p), wanted)]
    found = _one_space(found, space, root)
    if not found:
        in_space = f" in space {space!r}" if space is not None else ""
        kinds = f"*_{_PREPROC}.nii.gz" + (f" (nor *{_GIFTI}, *{_CIFTI})" if space else "")
        raise ConfigError(
            f"inputs.bids: no {kinds} under {root} matches the filters "
            f"{wanted}{in_space}; "
            "check the folder and the subjects/sessions/tasks/runs/space filters"
        )
    return sorted((_describe(*p, root, raw_root) for p in _pair_hemispheres(found)), key=_sort_key)


def _pair_hemispheres(paths: list[Path]) -> list[tuple[Path, Path | None]]:
    """Each run's series: ``(bold, None)``, or a GIFTI run's ``(left, right)``.

    Raises
    ------
    ConfigError
        If a GIFTI series has no ``hemi`` entity, or its run's other hemisphere is missing.
    """
    pairs: list[tuple[Path, Path | None]] = [
        (p, None) for p in paths if not p.name.endswith(_GIFTI)
    ]
    by_hemi: dict[str, dict[str, Path]] = {}
    for path in (p for p in paths if p.name.endswith(_GIFTI)):
        hemi = parse_entities(path).get("hemi")
        if hemi not in ("L", "R"):
            raise ConfigError(
                f"inputs.bids: {path} has no hemi-L or hemi-R entity; a GIFTI series of "
                "fMRIPrep names its hemisphere (*_hemi-L_space-<space>_bold.func.gii)"
            )
        run = path.name.replace(f"hemi-{hemi}_", "hemi-?_")
        by_hemi.setdefault(str(path.parent / run), {})[hemi] = path
    for hemis in by_hemi.values():
        if len(hemis) == 1:
            ((hemi, path),) = hemis.items()
            other = "R" if hemi == "L" else "L"
            missing = path.with_name(path.name.replace(f"hemi-{hemi}_", f"hemi-{other}_"))
            raise ConfigError(
                f"inputs.bids: {path} has no other hemisphere: {missing.name} is missing "
                "beside it; a surface run needs both hemispheres (add the file, or leave "
                "the run out with the subjects/sessions/tasks/runs filters)"
            )
        pairs.append((hemis["L"], hemis["R"]))
    return pairs


def _filters(
    subjects: Sequence[str] | None,
    sessions: Sequence[str] | None,
    tasks: Sequence[str] | None,
    runs: Sequence[str] | None,
) -> dict[str, list[str]]:
    given = {"sub": subjects, "ses": sessions, "task": tasks, "run": runs}
    return {key: [str(v) for v in values] for key, values in given.items() if values is not None}


def _keep(entities: dict[str, str], wanted: dict[str, list[str]]) -> bool:
    for key, values in wanted.items():
        value = entities.get(key)
        if value is None:
            return False
        if key == "run":
            if not value.isdigit() or int(value) not in {int(v) for v in values}:
                return False
        elif value not in values:
            return False
    return True


def _one_space(paths: list[Path], space: str | None, root: Path) -> list[Path]:
    if space is not None:
        return [p for p in paths if parse_entities(p).get("space") == space]
    spaces = sorted({parse_entities(p).get("space", "") for p in paths})
    if len(spaces) > 1:
        shown = ", ".join(s or "(none)" for s in spaces)
        raise ConfigError(
            f"inputs.bids.space: {root} has runs in several spaces ({shown}); "
            "set 'space' to one of them"
        )
    return paths


def _describe(bold: Path, right: Path | None, root: Path, raw: Path | None) -> Run:
    entities = parse_entities(bold)
    sidecar = _sidecar(bold, entities, root, raw)
    tr = _seconds(sidecar, "RepetitionTime", bold)
    start = _seconds(sidecar, "StartTime", bold)
    volume = bold.name.endswith((".nii", ".nii.gz")) and not bold.name.endswith(_CIFTI)
    masks = (".nii.gz", ".nii") if volume else ()  # fMRIPrep writes no surface masks
    return Run(
        bold=bold,
        subject=entities["sub"],
        task=entities.get("task"),
        session=entities.get("ses"),
        run=entities.get("run"),
        events=_events(bold, entities, root, raw),
        confounds=_first_existing(
            bold.parent / f"{_prefix(entities, drop=_NO_SPACE)}_{name}" for name in _CONFOUNDS
        ),
        mask=_first_existing(
            bold.parent / f"{_prefix(entities)}_desc-brain_mask{ext}" for ext in masks
        ),
        tr=tr,
        start_time=start,
        entities={k: v for k, v in entities.items() if k not in ("suffix", "hemi")},
        right=right,
    )


def _seconds(sidecar: dict[str, Any], key: str, bold: Path) -> float | None:
    """A sidecar time in seconds (a JSON number), None when absent; ConfigError otherwise."""
    value = sidecar.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"inputs: the JSON sidecar of {bold.name} has {key} {value!r}; expected a number "
            f"of seconds (e.g. 2.0); fix the sidecar, or give 'tr' with an explicit run"
        )
    return float(value)


_NO_SPACE = ("space", "res", "desc", "cohort", "hemi", "den")
_NO_DERIVED = ("space", "res", "desc", "cohort", "rec", "hemi", "den")


def _prefix(entities: dict[str, str], drop: Iterable[str] = ("desc",)) -> str:
    """The ``key-value`` part of a file name, without the dropped entities."""
    skip = set(drop) | {"suffix"}
    keys = [k for k in _ORDER if k in entities and k not in skip]
    keys += [k for k in entities if k not in _ORDER and k not in skip]
    return "_".join(f"{k}-{entities[k]}" for k in keys)


def _raw_func(bold: Path, root: Path, raw: Path | None) -> list[Path]:
    """Folders where raw-side files for this run may be: the raw func folder, then ours."""
    relative = bold.parent.relative_to(root)
    folders = [raw / relative] if raw is not None else []
    return [*folders, bold.parent]


def _events(bold: Path, entities: dict[str, str], root: Path, raw: Path | None) -> Path | None:
    name = f"{_prefix(entities, drop=_NO_DERIVED)}_events.tsv"
    inherited = f"task-{entities['task']}_events.tsv" if "task" in entities else None
    places = [folder / name for folder in _raw_func(bold, root, raw)]
    if inherited:
        places += [top / inherited for top in ([raw] if raw is not None else []) + [root]]
    return _first_existing(places)


def _sidecar(bold: Path, entities: dict[str, str], root: Path, raw: Path | None) -> dict[str, Any]:
    """Merged JSON metadata: inherited root file < raw bold sidecar < preprocessed sidecar."""
    raw_name = f"{_prefix(entities, drop=_NO_DERIVED)}_bold.json"
    layers: list[Path] = []
    if "task" in entities:
        layers += [top / f"task-{entities['task']}_bold.json" for top in (raw, root) if top]
    layers += [folder / raw_name for folder in _raw_func(bold, root, raw)]
    layers.append(bold.parent / f"{_stem(bold)}.json")
    merged: dict[str, Any] = {}
    for path in layers:
        if path.is_file():
            merged.update(_read_json(path))
    return merged


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path}: cannot read the JSON sidecar ({err}); fix or remove it"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a JSON sidecar must hold an object, not {type(data).__name__}")
    return data


def _first_existing(paths: Iterable[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _stem(path: Path) -> str:
    name = path.name
    for ext in (
        ".func.gii",
        ".shape.gii",
        ".dtseries.nii",
        ".nii.gz",
        ".nii",
        ".tsv",
        ".json",
        ".gz",
    ):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _sort_key(run: Run) -> tuple[str, ...]:
    return (run.subject, run.session or "", run.task or "", run.run or "", str(run.bold))
