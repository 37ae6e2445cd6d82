"""A synthetic first-level dataset with known activations, and how well bigglm recovers them.

:func:`make_dataset` writes one subject in the fMRIPrep derivatives layout: a 4 mm
MNI152 brain mask (shipped in ``bigglm/data``, block-averaged once from nilearn's 2 mm
mask), a 4D bold series on that grid, a JSON sidecar with the TR, and an events table
with two conditions (``faces`` and ``houses``) in blocks. The signal is a baseline that
varies smoothly in space, plus each condition's regressor (Glover HRF) times its true
effect map (Gaussian blobs: two face-selective, one house-selective, one shared "visual"
blob), plus AR(1) noise whose coefficient varies across the brain.

:func:`run_demo` writes the dataset, runs the whole pipeline on it (the same code path
as ``bigglm run``), and compares the estimated maps with the truth: correlation of the
estimated and true effects, and sensitivity/specificity of ``z > 3.1``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bigglm.config import AnalysisConfig, parse_config
from bigglm.exceptions import DesignError

__all__ = [
    "DemoTruth",
    "GroupRecovery",
    "Recovery",
    "StudyTruth",
    "group_recovery",
    "load_brain_mask",
    "make_dataset",
    "make_study",
    "recovery",
    "run_demo",
]

logger = logging.getLogger(__name__)

#: Blob centres (MNI mm), widths (mm) and peak effects per condition (signal units,
#: baseline ~1000, noise SD 10): the truth the demo must recover.
BLOBS: dict[str, list[tuple[tuple[float, float, float], float, float]]] = {
    "faces": [((40.0, -52.0, -18.0), 10.0, 24.0), ((-40.0, -52.0, -18.0), 10.0, 18.0)],
    "houses": [((28.0, -44.0, -8.0), 10.0, 20.0), ((-28.0, -44.0, -8.0), 10.0, 16.0)],
    "both": [((0.0, -84.0, 4.0), 12.0, 16.0)],
}
#: A voxel counts as truly active where its true effect exceeds this fraction of the peak.
ACTIVE_FRACTION = 0.25
#: Shortest demo run (s): room for a faces block and a houses block, whatever the seed.
MIN_DURATION = 80.0
Z_THRESHOLD = 3.1
#: Sign flips of the demo's group permutation test, and its family-wise alpha.
GROUP_PERMUTATIONS = 1000
FWE_ALPHA = 0.05
_SUBJECT, _TASK = "01", "demo"


def load_brain_mask() -> tuple[np.ndarray, np.ndarray]:
    """The shipped MNI152 brain mask at 4 mm and its affine.

    Returns
    -------
    mask : numpy.ndarray of bool, shape (49, 58, 47)
    affine : numpy.ndarray, shape (4, 4)

    Examples
    --------
    >>> mask, affine = load_brain_mask()
    >>> mask.shape, int(mask.sum()), float(affine[0, 0])
    ((49, 58, 47), 29794, 4.0)
    """
    with files("bigglm.data").joinpath("mni152_brain_mask_4mm.npz").open("rb") as handle:
        data = np.load(handle)
        return data["mask"].astype(bool), data["affine"].astype(np.float64)


@dataclass
class DemoTruth:
    """Where the demo dataset is and what it contains."""

    root: Path
    bold: Path
    mask: np.ndarray
    affine: np.ndarray
    effects: dict[str, np.ndarray]  # condition -> true effect volume
    tr: float
    n_scans: int


def _events(n_scans: int, tr: float, rng: np.random.Generator) -> pd.DataFrame:
    """Alternating 16 s blocks of faces and houses with jittered 8-16 s rest between."""
    rows: list[tuple[float, float, str]] = []
    onset, end = 6.0, n_scans * tr - 24.0
    conditions = ["faces", "houses"]
    while onset < end:
        rows.append((onset, 16.0, conditions[len(rows) % 2]))
        onset += 16.0 + float(rng.choice([8.0, 12.0, 16.0]))
    return pd.DataFrame(rows, columns=["onset", "duration", "trial_type"])


def _blob_map(mask: np.ndarray, affine: np.ndarray, blobs: list[Any]) -> np.ndarray:
    ijk = np.indices(mask.shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:]).T.reshape(*mask.shape, 3)
    out = np.zeros(mask.shape)
    for centre, width, peak in blobs:
        d2 = ((xyz - np.asarray(centre)) ** 2).sum(axis=-1)
        out += peak * np.exp(-d2 / (2 * width**2))
    return np.where(mask, out, 0.0)


def _true_effects(mask: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    shared = _blob_map(mask, affine, BLOBS["both"])
    return {c: _blob_map(mask, affine, BLOBS[c]) + shared for c in ("faces", "houses")}


def _ar1_noise(shape: tuple[int, int], rho: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stationary AR(1) noise of unit variance per column, coefficient ``rho`` per column."""
    n, v = shape
    noise = np.empty(shape)
    noise[0] = rng.standard_normal(v)
    innovation = np.sqrt(1 - rho**2)
    for t in range(1, n):
        noise[t] = rho * noise[t - 1] + innovation * rng.standard_normal(v)
    return noise


def _check_length(n_scans: int, tr: float) -> None:
    """Refuse a run too short for both conditions (DesignError with the minimum)."""
    shortest = int(np.ceil(MIN_DURATION / tr))
    if n_scans < shortest:
        raise DesignError(
            f"the demo run needs at least {shortest} volumes ({MIN_DURATION:g} s at a TR of "
            f"{tr:g} s, for a block of each condition), got {n_scans}; ask for more volumes"
        )


def make_dataset(
    folder: str | Path,
    *,
    n_scans: int = 160,
    tr: float = 2.0,
    noise_sd: float = 10.0,
    seed: int = 0,
    subject: str = _SUBJECT,
    scale: float = 1.0,
) -> DemoTruth:
    """Write one synthetic subject in fMRIPrep's layout and return the truth.

    Parameters
    ----------
    folder : str or Path
        The derivatives folder to create (``sub-<subject>/func/...`` inside).
    n_scans : int
        Volumes in the run.
    tr : float
        Repetition time (s).
    noise_sd : float
        Noise standard deviation (baseline is about 1000).
    seed : int
        Seed of the random generator; the same seed gives the same files.
    subject : str
        The subject label (``"01"``).
    scale : float
        This subject's effects are the population's (:data:`BLOBS`) times ``scale``.

    Returns
    -------
    DemoTruth
        Paths, the mask and the true effect maps.

    Raises
    ------
    DesignError
        If the run is shorter than :data:`MIN_DURATION`.

    Examples
    --------
    >>> import tempfile
    >>> truth = make_dataset(tempfile.mkdtemp(), n_scans=40)
    >>> truth.bold.name, nib.load(truth.bold).shape
    ('sub-01_task-demo_desc-preproc_bold.nii.gz', (49, 58, 47, 40))
    """
    from bigglm.design import frame_times, make_design

    _check_length(n_scans, tr)
    logger.info("demo: writing synthetic subject %s to %s", subject, folder)
    rng = np.random.default_rng(seed)
    mask, affine = load_brain_mask()
    func = Path(folder) / f"sub-{subject}" / "func"
    func.mkdir(parents=True, exist_ok=True)
    prefix = func / f"sub-{subject}_task-{_TASK}"
    events = _events(n_scans, tr, rng)
    events.to_csv(f"{prefix}_events.tsv", sep="\t", index=False)
    design = make_design(frame_times(n_scans, tr), events, hrf="glover", drift=None)
    effects = {c: scale * e for c, e in _true_effects(mask, affine).items()}
    inside = np.flatnonzero(mask.ravel())
    baseline = 1000.0 + 200.0 * _blob_map(mask, affine, [((0.0, -20.0, 10.0), 40.0, 1.0)])
    rho = 0.2 + 0.2 * rng.random(inside.size)
    signal = baseline.ravel()[inside] + sum(
        np.outer(design[c].to_numpy(), effects[c].ravel()[inside]) for c in ("faces", "houses")
    )
    series = signal + noise_sd * _ar1_noise((n_scans, inside.size), rho, rng)
    data = np.zeros((n_scans, mask.size), dtype=np.float32)
    data[:, inside] = series
    image = nib.Nifti1Image(np.moveaxis(data.reshape(n_scans, *mask.shape), 0, -1), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["pixdim"][4] = tr
    bold = Path(f"{prefix}_desc-preproc_bold.nii.gz")
    nib.save(image, bold)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), f"{prefix}_desc-brain_mask.nii.gz")
    sidecar = {"RepetitionTime": tr, "TaskName": _TASK, "SkullStripped": False}
    Path(f"{prefix}_desc-preproc_bold.json").write_text(json.dumps(sidecar, indent=2))
    (Path(folder) / "dataset_description.json").write_text(
        json.dumps({"Name": "bigglm demo", "BIDSVersion": "1.8.0", "DatasetType": "derivative"})
    )
    return DemoTruth(Path(folder), bold, mask, affine, effects, tr, n_scans)


@dataclass
class StudyTruth:
    """The demo study: its subjects' data and the population's true effects."""

    root: Path
    subjects: list[DemoTruth]
    effects: dict[str, np.ndarray]  # condition -> the population's true effect volume
    scales: list[float]  # each subject's effect amplitude relative to the population's
    noise_sds: list[float]

    @property
    def mask(self) -> np.ndarray:
        return self.subjects[0].mask


def make_study(
    folder: str | Path, *, n_subjects: int = 12, n_scans: int = 160, seed: int = 0
) -> StudyTruth:
    """Write a small study: ``n_subjects`` synthetic subjects that differ as people do.

    Subject ``s`` has the population's effects (:data:`BLOBS`) times an amplitude drawn
    from N(1, 0.3²) (at least 0.2), noise of standard deviation 10 × U(0.7, 1.5), and its
    own events' jitter and noise; a ``participants.tsv`` lists them. The group truth is the
    population's effect: a one-sample group test of ``faces - houses`` should find the
    face- and house-selective blobs, and nothing where faces and houses are equal.

    Examples
    --------
    >>> import tempfile
    >>> study = make_study(tempfile.mkdtemp(), n_subjects=2, n_scans=40)
    >>> [t.bold.name for t in study.subjects][1]
    'sub-02_task-demo_desc-preproc_bold.nii.gz'
    """
    if n_subjects < 1:
        raise DesignError(f"the demo needs at least 1 subject, got {n_subjects}")
    rng = np.random.default_rng(seed)
    scales = np.maximum(rng.normal(1.0, 0.3, n_subjects), 0.2).round(3).tolist()
    noise = (10.0 * rng.uniform(0.7, 1.5, n_subjects)).round(2).tolist()
    labels = [f"{i + 1:02d}" for i in range(n_subjects)]
    subjects = [
        make_dataset(
            folder, n_scans=n_scans, noise_sd=sd, seed=seed * 1000 + i, subject=label, scale=k
        )
        for i, (label, k, sd) in enumerate(zip(labels, scales, noise, strict=True))
    ]
    table = pd.DataFrame(
        {"participant_id": [f"sub-{s}" for s in labels], "amplitude": scales, "noise_sd": noise}
    )
    table.to_csv(Path(folder) / "participants.tsv", sep="\t", index=False)
    mask, affine = subjects[0].mask, subjects[0].affine
    return StudyTruth(Path(folder), subjects, _true_effects(mask, affine), scales, noise)


def demo_config(
    truth: DemoTruth | StudyTruth, outputs: str | Path, **cluster: Any
) -> AnalysisConfig:
    """The analysis the demo runs: AR(1), both conditions, their difference and an F test.

    Parameters
    ----------
    truth : DemoTruth
        From :func:`make_dataset`.
    outputs : str or Path
        The output folder.
    **cluster
        The ``cluster`` section (default: a local cluster).

    Returns
    -------
    AnalysisConfig

    Examples
    --------
    >>> import tempfile
    >>> truth = make_dataset(tempfile.mkdtemp(), n_scans=40)
    >>> sorted(demo_config(truth, "out").contrasts)
    ['effects_of_interest', 'faces', 'faces_minus_houses', 'houses']

    A study of several subjects also has a group level: a one-sample test of
    ``faces_minus_houses``, with permutation FWE inference.
    """
    config: dict[str, Any] = {
        "inputs": {"bids": {"derivatives": str(truth.root), "tasks": [_TASK]}},
        "model": {"hrf": "glover", "drift": "cosine", "high_pass": 0.01, "noise": "ar1"},
        "contrasts": {
            "faces": "faces",
            "houses": "houses",
            "faces_minus_houses": "faces - houses",
            "effects_of_interest": ["faces", "houses"],
        },
        "outputs": {"folder": str(outputs), "maps": ["effect", "variance", "stat", "z"]},
        "cluster": cluster or {"profile": "local"},
    }
    if isinstance(truth, StudyTruth) and len(truth.subjects) > 1:
        config["outputs"]["report"] = False  # one report per subject would double the time;
        # the group level's report is written
        config["group"] = {
            "inputs": ["faces_minus_houses"],
            "contrasts": {"mean": "intercept"},
            "inference": {
                "height_control": None,
                "permutation": {"n_perm": GROUP_PERMUTATIONS, "seed": 0, "two_sided": True},
            },
        }
    return parse_config(config)


@dataclass
class Recovery:
    """How well one contrast's truth was recovered."""

    contrast: str
    correlation: float
    sensitivity: float
    specificity: float
    n_active: int
    n_detected: int
    false_positives: int
    expected_false_positives: float = 0.0


@dataclass
class DemoReport:
    """The demo's result: where things are, and the recovery of each contrast."""

    data: Path
    outputs: Path
    recoveries: list[Recovery] = field(default_factory=list)
    n_voxels: int = 0
    n_scans: int = 0
    outcomes: list[Any] = field(default_factory=list)
    group: GroupRecovery | None = None


def recovery(
    contrast: str, true_effect: np.ndarray, effect_map: Path, z_map: Path, mask: np.ndarray
) -> Recovery:
    """Compare an estimated contrast with its truth inside the mask.

    Parameters
    ----------
    contrast : str
        The contrast's name.
    true_effect : numpy.ndarray
        The true contrast effect volume.
    effect_map, z_map : Path
        The estimated effect and z NIfTI maps.
    mask : numpy.ndarray of bool
        The brain mask.

    Returns
    -------
    Recovery
        Pearson correlation of estimated and true effects; sensitivity (fraction of
        truly active voxels, ``|effect| > 0.25 * peak``, with ``z > 3.1`` in the right
        direction) and specificity (fraction of inactive voxels, true effect 0 to 1e-3 of
        the peak, without ``|z| > 3.1``).

    Examples
    --------
    >>> import tempfile
    >>> m = np.ones((2, 2, 1), bool); truth = np.array([[[4.0], [0.0]], [[0.0], [0.0]]])
    >>> folder = Path(tempfile.mkdtemp())
    >>> nib.save(nib.Nifti1Image(truth, np.eye(4)), folder / "e.nii.gz")
    >>> nib.save(nib.Nifti1Image(truth * 2, np.eye(4)), folder / "z.nii.gz")
    >>> r = recovery("a", truth, folder / "e.nii.gz", folder / "z.nii.gz", m)
    >>> r.correlation, r.sensitivity, r.specificity
    (1.0, 1.0, 1.0)
    """
    from scipy.stats import norm

    estimate = np.asarray(_image(effect_map).dataobj)[mask]
    z = np.asarray(_image(z_map).dataobj)[mask]
    true = true_effect[mask]
    peak = np.abs(true).max()
    active = np.abs(true) > ACTIVE_FRACTION * peak
    inactive = np.abs(true) <= 1e-3 * peak
    detected = np.sign(true) * z > Z_THRESHOLD
    false = inactive & (np.abs(z) > Z_THRESHOLD)
    ok = np.isfinite(estimate)
    return Recovery(
        contrast=contrast,
        correlation=round(float(np.corrcoef(estimate[ok], true[ok])[0, 1]), 6),
        sensitivity=round(float(detected[active].mean()), 6),
        specificity=round(float(1 - false[inactive].mean()), 6),
        n_active=int(active.sum()),
        n_detected=int((detected & active).sum()),
        false_positives=int(false.sum()),
        expected_false_positives=round(float(inactive.sum() * 2 * norm.sf(Z_THRESHOLD)), 1),
    )


def _image(path: Path) -> Any:
    return nib.load(path)


def run_demo(
    folder: str | Path,
    *,
    n_scans: int = 160,
    n_subjects: int = 12,
    seed: int = 0,
    client: Any = None,
    progress: Any = None,
) -> DemoReport:
    """Make the synthetic study, run the whole pipeline on it, and score the recovery.

    Parameters
    ----------
    folder : str or Path
        Working folder: ``data/`` (the dataset) and ``results/`` (the analysis) go in it.
    n_scans : int
        Volumes in each subject's run.
    n_subjects : int
        Subjects (:func:`make_study`); with more than one, the group level runs too.
    seed : int
        Random seed.
    client : distributed.Client, optional
        Dask client; default: a local cluster sized to the machine.
    progress : callable, optional
        Passed to :func:`bigglm.pipeline.run_analysis`.

    Returns
    -------
    DemoReport
        Paths, the first level's recovery of ``faces``, ``houses`` and
        ``faces_minus_houses`` in subject 01, and the group level's of
        ``faces_minus_houses`` (:class:`GroupRecovery`).

    Examples
    --------
    A whole run starts a local cluster and takes about a minute (``tests/test_demo.py``
    runs it):

    >>> import tempfile
    >>> report = run_demo(tempfile.mkdtemp(), n_scans=60)  # doctest: +SKIP
    >>> [r.contrast for r in report.recoveries]  # doctest: +SKIP
    ['faces', 'houses', 'faces_minus_houses']
    """
    from bigglm.pipeline import UnitOutcome, map_path, run_analysis

    folder = Path(folder)
    study = make_study(folder / "data", n_subjects=n_subjects, n_scans=n_scans, seed=seed)
    config = demo_config(study, folder / "results")
    outcomes = run_analysis(config, client=client, progress=progress)
    report = DemoReport(folder / "data", folder / "results", n_scans=n_scans, outcomes=outcomes)
    report.n_voxels = int(study.mask.sum())
    first = study.subjects[0]
    unit = outcomes[0]
    assert isinstance(unit, UnitOutcome)
    for name, true_effect in _contrast_truths(first.effects).items():
        paths = {stat: map_path(config, unit.name, name, stat) for stat in ("effect", "z")}
        report.recoveries.append(
            recovery(name, true_effect, paths["effect"], paths["z"], study.mask)
        )
    if config.group is not None:
        folder_of = config.outputs.folder / "group" / "contrast-facesMinusHouses"
        truth = _contrast_truths(study.effects)["faces_minus_houses"]
        report.group = group_recovery(truth, folder_of, study.mask, n_subjects)
    return report


def _contrast_truths(effects: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "faces": effects["faces"],
        "houses": effects["houses"],
        "faces_minus_houses": effects["faces"] - effects["houses"],
    }


@dataclass
class GroupRecovery:
    """How well the group level recovered the population's ``faces - houses``."""

    n_subjects: int
    correlation: float
    sensitivity: float  # active voxels with p(FWE) < alpha, in the right direction
    n_active: int
    n_null: int
    false_positives: int  # null voxels with p(FWE) < alpha

    @property
    def fwe_held(self) -> bool:
        """No null voxel reached p(FWE) < alpha (which happens in 5% of null studies)."""
        return self.false_positives == 0


def group_recovery(
    truth: np.ndarray, folder: Path, mask: np.ndarray, n_subjects: int
) -> GroupRecovery:
    """Score the group maps of one contrast against the population's true effect.

    Active voxels: ``|truth| > 0.25`` of its peak; null voxels: ``|truth| <= 1e-3`` of its
    peak (faces and houses equal there). Detected: permutation p(FWE) (max-T, two-sided)
    below :data:`FWE_ALPHA` with the t of the true sign.
    """
    from bigglm.glm.contrasts import map_file_name

    def values(prefix: str, stat: str) -> np.ndarray:
        return np.asarray(_image(folder / map_file_name(prefix, "mean", stat)).dataobj)

    effect = values("group", "effect")
    t = values("group_desc-permutation", "t")
    logp = values("group_desc-permutation", "logpmaxt")
    true, estimate = truth[mask], effect[mask]
    significant = logp[mask] > -np.log10(FWE_ALPHA)
    peak = np.abs(true).max()
    active = np.abs(true) > ACTIVE_FRACTION * peak
    null = np.abs(true) <= 1e-3 * peak
    detected = significant & (np.sign(t[mask]) == np.sign(true))
    ok = np.isfinite(estimate)
    return GroupRecovery(
        n_subjects=n_subjects,
        correlation=round(float(np.corrcoef(estimate[ok], true[ok])[0, 1]), 6),
        sensitivity=round(float(detected[active].mean()), 6),
        n_active=int(active.sum()),
        n_null=int(null.sum()),
        false_positives=int((significant & null).sum()),
    )


def format_report(report: DemoReport) -> str:
    """The demo's on-screen summary: one line per contrast.

    Parameters
    ----------
    report : DemoReport
        From :func:`run_demo`.

    Returns
    -------
    str
        A small table.

    Examples
    --------
    >>> r = DemoReport(Path("d"), Path("o"), [Recovery("faces", 0.93, 0.9, 0.999, 100, 90, 2, 3.0)])
    >>> print(format_report(r).splitlines()[-1])
    faces                     0.930         90.0%        99.90%      90/100    2        3
    """
    lines = [
        f"truth recovery (z > {Z_THRESHOLD}; active = true effect > "
        f"{ACTIVE_FRACTION:.0%} of its peak)",
        f"{'contrast':<20} {'corr(est, true)':>15} {'sensitivity':>13} {'specificity':>13} "
        f"{'detected':>11} {'FP':>4} {'(chance)':>8}",
    ]
    for r in report.recoveries:
        lines.append(
            f"{r.contrast:<20} {r.correlation:>10.3f} {r.sensitivity:>13.1%} "
            f"{r.specificity:>13.2%} {r.n_detected:>7}/{r.n_active:<3} {r.false_positives:>4} "
            f"{r.expected_false_positives:>8.0f}"
        )
    g = report.group
    if g is not None:
        held = "held" if g.fwe_held else "NOT held (this happens in 5% of null studies)"
        lines += [
            f"group level ({g.n_subjects} subjects, one-sample faces_minus_houses, "
            f"{GROUP_PERMUTATIONS} sign flips, max-T p(FWE) < {FWE_ALPHA:g}):",
            f"  corr(group effect, population truth) {g.correlation:.3f}; sensitivity "
            f"{g.sensitivity:.1%} of {g.n_active} active voxels",
            f"  FWE control {held}: {g.false_positives} of {g.n_null} null voxels significant",
        ]
    return "\n".join(lines)
