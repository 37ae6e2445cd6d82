"""The demo: a synthetic subject with known activations, and their recovery by the pipeline.

The reference is the truth the demo itself planted (effect maps, AR(1) noise); the
thresholds are far from what the fit achieves (see the numbers ``bigglm demo`` prints)
yet far above chance (a random map has correlation ~0 and sensitivity ~0.1%).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bigglm.bids import find_runs
from bigglm.demo import load_brain_mask, make_dataset, make_study, run_demo


def test_dataset_has_the_fmriprep_layout_and_planted_truth(tmp_path: Path) -> None:
    truth = make_dataset(tmp_path, n_scans=50)
    (run,) = find_runs(tmp_path)
    assert (run.subject, run.task, run.tr) == ("01", "demo", 2.0)
    assert run.mask is not None and run.events is not None
    events = pd.read_csv(run.events, sep="\t")
    assert set(events["trial_type"]) == {"faces", "houses"}
    mask, affine = load_brain_mask()
    np.testing.assert_array_equal(np.asarray(nib.load(run.mask).dataobj) > 0, mask)
    np.testing.assert_allclose(nib.load(truth.bold).affine, affine)
    assert truth.effects["faces"].max() > 0 and truth.effects["faces"][~mask].max() == 0


def test_noise_is_autocorrelated_as_planted(tmp_path: Path) -> None:
    """Far from every blob the series is baseline + AR(1) noise with rho in [0.2, 0.4]."""
    truth = make_dataset(tmp_path, n_scans=200, seed=3)
    data = np.asarray(nib.load(truth.bold).dataobj, dtype=np.float64)[truth.mask]  # (V, T)
    quiet = (truth.effects["faces"] + truth.effects["houses"])[truth.mask] < 1e-6
    y = data[quiet] - data[quiet].mean(axis=1, keepdims=True)
    rho = (y[:, 1:] * y[:, :-1]).sum(axis=1) / (y**2).sum(axis=1)
    assert 0.2 < np.median(rho) < 0.4  # Yule-Walker lag-1 estimate of the planted 0.2-0.4
    assert 8.0 < np.median(y.std(axis=1)) < 12.0  # noise SD 10


@pytest.mark.cluster
def test_demo_recovers_the_planted_activations(tmp_path: Path, local_client: Any) -> None:
    report = run_demo(tmp_path, n_scans=120, n_subjects=1, client=local_client)
    by_name = {r.contrast: r for r in report.recoveries}
    assert sorted(by_name) == ["faces", "faces_minus_houses", "houses"]
    for r in by_name.values():
        assert r.correlation > 0.4, r
        assert r.sensitivity > 0.4, r
        assert r.specificity > 0.98, r
    assert (tmp_path / "results" / "sub-01" / "sub-01_task-demo_provenance.json").is_file()
    assert report.group is None and not (tmp_path / "results" / "group").exists()


def test_study_subjects_differ_as_planted(tmp_path: Path) -> None:
    study = make_study(tmp_path, n_subjects=3, n_scans=40, seed=5)
    table = pd.read_csv(tmp_path / "participants.tsv", sep="\t")
    assert list(table["participant_id"]) == ["sub-01", "sub-02", "sub-03"]
    assert table["amplitude"].tolist() == study.scales and len(set(study.noise_sds)) == 3
    for subject, scale in zip(study.subjects, study.scales, strict=True):
        np.testing.assert_allclose(subject.effects["faces"], scale * study.effects["faces"])
    assert len({s.bold.read_bytes()[-64:] for s in study.subjects}) == 3  # own noise each


@pytest.mark.cluster
def test_demo_study_recovers_the_group_truth(tmp_path: Path, local_client: Any) -> None:
    report = run_demo(tmp_path, n_scans=100, n_subjects=8, client=local_client)
    g = report.group
    assert g is not None and g.n_subjects == 8
    assert g.correlation > 0.7 and g.sensitivity > 0.05, g  # 8 subjects: 11% here, 62% at 12
    # FWE control where faces and houses are equal: for this fixed seed no null voxel
    # passes (the 5% family-wise rate itself is tested on 200 null datasets elsewhere)
    assert g.n_null > 10000 and g.false_positives == 0, g


@pytest.mark.cluster
def test_bigglm_demo_command_prints_the_recovery(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bigglm.cli", "-q", "demo", "--output", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "sub-01_task-demo: 1 run, 160 volumes, 29794 voxels" in done.stdout
    rows = re.findall(
        r"^(faces|houses|faces_minus_houses)\s+([0-9.]+)\s+([0-9.]+)%", done.stdout, re.M
    )
    assert [r[0] for r in rows] == ["faces", "houses", "faces_minus_houses"]
    # subject 01 of the study, a random person (amplitude and noise drawn): as in the API test
    assert all(float(corr) > 0.4 and float(sens) > 40 for _, corr, sens in rows), done.stdout
    assert "group level (12 subjects, one-sample faces_minus_houses" in done.stdout
    assert re.search(r"FWE control held: 0 of \d+ null voxels significant", done.stdout)
