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

__all__ = ["DemoTruth", "Recovery", "load_brain_mask", "make_dataset", "recovery", "run_demo"]

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
) -> DemoTruth:
    """Write the synthetic subject in fMRIPrep's layout and return the truth.

    Parameters
    ----------
    folder : str or Path
        The derivatives folder to create (``sub-01/func/...`` inside).
    n_scans : int
        Volumes in the run.
    tr : float
        Repetition time (s).
    noise_sd : float
        Noise standard deviation (baseline is about 1000).
    seed : int
        Seed of the random generator; the same seed gives the same files.

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
    logger.info("demo: writing a synthetic subject to %s", folder)
    rng = np.random.default_rng(seed)
    mask, affine = load_brain_mask()
    func = Path(folder) / f"sub-{_SUBJECT}" / "func"
    func.mkdir(parents=True, exist_ok=True)
    prefix = func / f"sub-{_SUBJECT}_task-{_TASK}"
    events = _events(n_scans, tr, rng)
    events.to_csv(f"{prefix}_events.tsv", sep="\t", index=False)
    design = make_design(frame_times(n_scans, tr), events, hrf="glover", drift=None)
    effects = _true_effects(mask, affine)
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


def demo_config(truth: DemoTruth, outputs: str | Path, **cluster: Any) -> AnalysisConfig:
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
    """
    return parse_config(
        {
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
    )


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
    seed: int = 0,
    client: Any = None,
    progress: Any = None,
) -> DemoReport:
    """Make the synthetic dataset, run the whole pipeline on it, and score the recovery.

    Parameters
    ----------
    folder : str or Path
        Working folder: ``data/`` (the dataset) and ``results/`` (the analysis) go in it.
    n_scans : int
        Volumes in the synthetic run.
    seed : int
        Random seed.
    client : distributed.Client, optional
        Dask client; default: a local cluster sized to the machine.
    progress : callable, optional
        Passed to :func:`bigglm.pipeline.run_analysis`.

    Returns
    -------
    DemoReport
        Paths and the recovery of ``faces``, ``houses`` and ``faces_minus_houses``.

    Examples
    --------
    A whole run starts a local cluster and takes seconds (``tests/test_demo.py``
    runs it):

    >>> import tempfile
    >>> report = run_demo(tempfile.mkdtemp(), n_scans=60)  # doctest: +SKIP
    >>> [r.contrast for r in report.recoveries]  # doctest: +SKIP
    ['faces', 'houses', 'faces_minus_houses']
    """
    from bigglm.pipeline import run_analysis

    folder = Path(folder)
    truth = make_dataset(folder / "data", n_scans=n_scans, seed=seed)
    config = demo_config(truth, folder / "results")
    (outcome,) = run_analysis(config, client=client, progress=progress)
    report = DemoReport(folder / "data", folder / "results", n_scans=n_scans, outcomes=[outcome])
    report.n_voxels = int(truth.mask.sum())
    effects = {
        "faces": truth.effects["faces"],
        "houses": truth.effects["houses"],
        "faces_minus_houses": truth.effects["faces"] - truth.effects["houses"],
    }
    from bigglm.pipeline import map_path

    for name, true_effect in effects.items():
        paths = {stat: map_path(config, outcome.name, name, stat) for stat in ("effect", "z")}
        report.recoveries.append(
            recovery(name, true_effect, paths["effect"], paths["z"], truth.mask)
        )
    return report


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
    return "\n".join(lines)
