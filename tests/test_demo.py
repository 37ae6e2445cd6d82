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
from bigglm.demo import load_brain_mask, make_dataset, run_demo


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
    report = run_demo(tmp_path, n_scans=120, client=local_client)
    by_name = {r.contrast: r for r in report.recoveries}
    assert sorted(by_name) == ["faces", "faces_minus_houses", "houses"]
    for r in by_name.values():
        assert r.correlation > 0.4, r
        assert r.sensitivity > 0.4, r
        assert r.specificity > 0.98, r
    assert (tmp_path / "results" / "sub-01" / "sub-01_task-demo_provenance.json").is_file()


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
    assert all(float(corr) > 0.5 and float(sens) > 50 for _, corr, sens in rows), done.stdout
