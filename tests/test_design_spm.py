"""SPM conventions (``bigglm.design.spm``) against what SPM computed in MATLAB.

References, none written here (``../shared/peer-data``, see its README):

- ``pyhrf_localizer/SPM_v{5,8,12}.mat.gz``: the designs SPM5, SPM8 and SPM12b built for a
  2-session localizer (RT 2.4 s, T 16, T0 1 / 1 / 8, canonical HRF). The onsets and
  durations given to SPM are read from the same files (``SPM.Sess(s).U``), so the test
  rebuilds each session's columns from SPM's own inputs. Tolerance 1e-10 of each
  column's peak: both are float64 sums of the same products (seen: 6e-16).
- ``spm_hrf_dmtx_nipy/spm_hrfs.mat``: 54 ``spm_hrf`` curves for varied RT and parameters
  (1e-12 of the peak; seen 1.5e-15); ``spm_bases.mat``: the canonical HRF and its raw
  temporal and dispersion derivatives at dt 0.01 (the dispersion derivative is a
  difference quotient with step 0.01, so its cancellation error is ~1e-12 of its peak:
  1e-10); ``dct_{5,10,100}.txt``: ``spm_dctmtx`` printed with 8 significant digits (1e-8).
- A plain numpy transcription of SPM's OLS estimation (filter ``K``, residual-forming
  matrix, ``trRV``) on the real localizer BOLD, for the claim that the DCT set as design
  columns gives SPM's t and degrees of freedom.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io
import xarray as xr
from spm_peer import LOCALIZER, PEER, session_events, spm_mat

import bigglm
from bigglm.design import make_run_design
from bigglm.design.spm import spm_basis, spm_dctmtx, spm_design, spm_hrf
from bigglm.exceptions import DesignError

NIPY = PEER / "spm_hrf_dmtx_nipy"


def _peak_error(mine: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(mine - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("version", ["5", "8", "12"])
@pytest.mark.parametrize("session", [0, 1])
def test_design_equalsspm_mat(version: str, session: int) -> None:
    spm = spm_mat(version)
    assert spm.xBF.UNITS == "secs" and spm.xBF.name == "hrf"
    n, tr = int(spm.nscan[session]), float(spm.xY.RT)
    X = spm_design(
        n,
        tr,
        session_events(spm, session),
        convention=f"spm{version}",
        high_pass=float(spm.xX.K[session].HParam),
        microtime_resolution=int(spm.xBF.T),
        microtime_onset=int(spm.xBF.T0),
    )
    rows = np.asarray(spm.Sess[session].row) - 1
    columns = np.asarray(spm.Sess[session].col) - 1
    for name, col in zip(["audio", "video"], columns, strict=True):
        assert _peak_error(X[name].to_numpy(), spm.xX.X[rows, col]) < 1e-10
    x0 = spm.xX.K[session].X0
    drifts = X.filter(like="drift_").to_numpy()
    assert drifts.shape == x0.shape
    np.testing.assert_allclose(drifts, x0, atol=1e-12)
    constant = spm.xX.X[rows, spm.xX.iB[session] - 1]
    np.testing.assert_array_equal(X["constant"].to_numpy(), constant)


def test_release_defaults_differ_only_in_the_sampling_bin() -> None:
    """SPM12 moved time zero one bin later and samples at T0 = 8 by default; with the same
    T0 the SPM5 and SPM12 designs are the same regressors read one bin apart."""
    spm12 = spm_mat("12")
    events = session_events(spm12, 0)
    new = spm_design(125, 2.4, events, convention="spm12")
    old = spm_design(125, 2.4, events, convention="spm5")
    assert _peak_error(new["audio"].to_numpy(), spm12.xX.X[:125, 0]) < 1e-10
    np.testing.assert_allclose(new.index - old.index, 6 * 2.4 / 16)
    same_bin = spm_design(125, 2.4, events, convention="spm5", microtime_onset=7)
    np.testing.assert_allclose(same_bin["audio"], new["audio"], atol=1e-15)


def test_spm_hrf_equals_spm() -> None:
    mat = scipy.io.loadmat(NIPY / "spm_hrfs.mat", squeeze_me=True)
    errors = [
        _peak_error(spm_hrf(float(p[0]), list(p[1:])), np.asarray(h))
        for p, h in zip(mat["params"], mat["hrfs"], strict=True)
    ]
    assert len(errors) == 54 and max(errors) < 1e-12


def test_spm_bases_equal_spm() -> None:
    mat = scipy.io.loadmat(NIPY / "spm_bases.mat", squeeze_me=True)
    raw = spm_basis(float(mat["dt"]), "spm + derivative + dispersion", orthogonal=False)
    assert _peak_error(raw[:, 0], mat["hrf"]) < 1e-12
    assert _peak_error(raw[:, 1], mat["dhrf"]) < 1e-12
    assert _peak_error(raw[:, 2], mat["ddhrf"]) < 1e-10
    basis = spm_basis(float(mat["dt"]), "spm + derivative + dispersion")
    np.testing.assert_array_equal(basis[:, 0], raw[:, 0])  # spm_orth keeps the first column
    gram = basis.T @ basis
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-12 * np.diag(gram).max()


@pytest.mark.parametrize("n", [5, 10, 100])
def test_spm_dctmtx_equals_spm(n: int) -> None:
    reference = np.loadtxt(NIPY / f"dct_{n}.txt")
    np.testing.assert_allclose(spm_dctmtx(n, reference.shape[1]), reference, atol=1e-8)


def _localizer_bold() -> np.ndarray:
    bold = np.asarray(nib.load(LOCALIZER / "subj0_bold_session0.nii.gz").dataobj, float)
    mask = np.asarray(nib.load(LOCALIZER / "subj0_parcellation.nii.gz").dataobj) > 0
    return bold[mask].T  # (125 scans, 1272 voxels)


def _spm_ols_t(y: np.ndarray, x: np.ndarray, x0: np.ndarray, c: np.ndarray) -> tuple:
    """spm_spm with V = I, written out: K = I - X0 X0', KX, KY, trRV = tr(R K)."""
    n = y.shape[0]
    k = np.eye(n) - x0 @ x0.T
    kx, ky = k @ x, k @ y
    pkx = np.linalg.pinv(kx)
    beta = pkx @ ky
    r = np.eye(n) - kx @ pkx
    res = r @ ky
    tr_rv = np.trace(r @ k)
    res_ms = (res**2).sum(axis=0) / tr_rv
    bcov = pkx @ k @ pkx.T
    return (c @ beta) / np.sqrt(res_ms * (c @ bcov @ c)), tr_rv


def test_ols_t_with_dct_columns_equals_spm_filtered_fit() -> None:
    spm = spm_mat("12")
    y = _localizer_bold()
    X = spm_design(125, 2.4, session_events(spm, 0), convention="spm12")
    result = bigglm.fit(xr.Dataset({"bold": (("time", "voxel"), y)}), X).compute()
    con = result.contrast("audio - video")
    x_spm = spm.xX.X[:125][:, [0, 1, 4]]  # Sn(1) audio, video, constant
    t_spm, tr_rv = _spm_ols_t(y, x_spm, spm.xX.K[0].X0, np.array([1.0, -1.0, 0.0]))
    np.testing.assert_allclose(con["stat"].to_numpy(), t_spm, rtol=1e-8, atol=1e-10)
    assert float(con["dof"]) == pytest.approx(tr_rv, abs=1e-9)


def test_make_run_design_convention() -> None:
    events = pd.DataFrame({"onset": [10.0, 50.0], "duration": [0.0, 0.0], "trial_type": "go"})
    X = make_run_design(60, 2.0, events=events, convention="spm12", hrf="spm + derivative")
    assert list(X.columns[:2]) == ["go", "go_derivative"]
    assert X.columns[-1] == "constant" and X.filter(like="drift_").shape[1] == 1
    nilearn_like = make_run_design(60, 2.0, events=events)
    assert nilearn_like.shape[1] != X.shape[1] or not np.allclose(nilearn_like, X)


def test_zero_durations_are_spikes_of_unit_area() -> None:
    """spm_get_ons scales an all-zero-duration condition by 1/dt (area 1 per event), the
    area of a 1 s block; without the scaling the spike's regressor would be 16 times
    smaller."""
    events = pd.DataFrame({"onset": [20.0], "duration": [0.0], "trial_type": "e"})
    spike = spm_design(200, 1.0, events, microtime_resolution=16, high_pass=None)["e"]
    block = spm_design(
        200, 1.0, events.assign(duration=1.0 - 1 / 16), microtime_resolution=16, high_pass=None
    )["e"]
    # a TR of 1 s: the samples of a unit-area response sum to its area, to the error of
    # reading a smooth curve once per 16 bins
    np.testing.assert_allclose(spike.sum(), 1.0, rtol=1e-3)
    np.testing.assert_allclose(block.sum(), 1.0, rtol=1e-3)  # 16 bins of height 1 = 1 s


def test_modulator_is_centred_and_orthogonal() -> None:
    onsets = np.arange(10.0, 300.0, 20.0)
    rt = np.linspace(0.4, 1.2, onsets.size)
    events = pd.DataFrame({"onset": onsets, "duration": 0.0, "trial_type": "go", "rt": rt})
    X = spm_design(160, 2.0, events, modulators=["rt"], high_pass=None)
    assert list(X.columns) == ["go", "go_x_rt", "constant"]
    assert abs(float(X["go"] @ X["go_x_rt"])) < 1e-10 * float(X["go"] @ X["go"])
    constant_rt = spm_design(160, 2.0, events.assign(rt=1.0), modulators=["rt"], high_pass=None)
    assert list(constant_rt.columns) == ["go", "constant"]  # no variance: no column, as SPM


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"high_pass": 0.01}, "cut-off period in seconds, not Hz (did you mean 100 s?)"),
        ({"hrf": "glover"}, "is not an SPM basis"),
        ({"microtime_onset": 17}, "must be a bin 1..16"),
        ({"modulators": ["rt"]}, "has no column 'rt'"),
        ({"convention": "spm99"}, "not an SPM release"),
        ({"units": "ms"}, "use 'secs' or 'scans'"),
    ],
)
def test_bad_options_are_one_message(options: dict[str, Any], message: str) -> None:
    events = pd.DataFrame({"onset": [10.0], "duration": [1.0], "trial_type": "go"})
    with pytest.raises(DesignError, match=re.escape(message)):
        spm_design(60, 2.0, events, **options)


def test_nilearn_options_are_refused_in_an_spm_convention() -> None:
    with pytest.raises(
        DesignError, match=r"unknown design option\(s\) \['oversampling'\] for the spm12"
    ):
        make_run_design(60, 2.0, convention="spm12", oversampling=16)


def test_config_convention_defaults_and_refusals() -> None:
    from bigglm.config import ModelConfig, parse_section
    from bigglm.exceptions import ConfigError

    spm = parse_section(ModelConfig, {"convention": "spm12", "hrf": "spm + derivative"})
    options = spm.design_options()
    assert options["high_pass"] == 128.0 and options["convention"] == "spm12"
    assert "oversampling" not in options and options["microtime_resolution"] == 16
    # the convention alone is enough: its canonical basis is SPM's
    assert parse_section(ModelConfig, {"convention": "spm8"}).design_options()["hrf"] == "spm"
    nilearn = parse_section(ModelConfig, {}).design_options()
    assert nilearn["high_pass"] == 0.01 and "units" not in nilearn
    refusals = [
        ({"convention": "spm12", "hrf": "spm", "high_pass": 0.01}, "not Hz; did you mean 100?"),
        ({"convention": "spm12", "hrf": "spm", "oversampling": 16}, "not an option of the spm12"),
        ({"microtime_onset": 8}, "not an option of the nilearn convention"),
        ({"convention": "spm8", "hrf": "glover"}, "hrf 'glover' is not an SPM basis"),
    ]
    for section, message in refusals:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_section(ModelConfig, section)


def test_workflow_writes_the_spm12_design(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """A YAML-style analysis in the spm12 convention fits SPM's design: the written design
    equals spm_design plus the confounds, and the t map equals a plain OLS on it."""
    from bigglm.config import parse_config
    from bigglm.pipeline import map_path, run_analysis

    model = {"noise": "ols", "convention": "spm12", "hrf": "spm", "high_pass": 100}
    config = parse_config(tiny_config(tiny_bids, tmp_path / "out", model=model))
    run_analysis(config, client=local_client)
    raw = tiny_bids / "raw/sub-01/func/sub-01_task-tiny_events.tsv"
    expected = spm_design(60, 2.0, raw, high_pass=100)
    written = pd.read_csv(tmp_path / "out/sub-01/sub-01_task-tiny_design.tsv", sep="\t")
    assert list(written.columns) == [
        *[c for c in expected.columns if not c.startswith(("drift_", "constant"))],
        "trans_x",
        "rot_x",
        *[c for c in expected.columns if c.startswith(("drift_", "constant"))],
    ]
    np.testing.assert_allclose(written[list(expected.columns)], expected, atol=1e-12)

    func = tiny_bids / "derivatives/sub-01/func"
    mask = np.asarray(nib.load(func / "sub-01_task-tiny_desc-brain_mask.nii.gz").dataobj) > 0
    bold = np.asarray(nib.load(func / "sub-01_task-tiny_desc-preproc_bold.nii.gz").dataobj)
    y = bold[mask].T.astype(np.float64)
    x = written.to_numpy()
    c = (written.columns == "a").astype(float)
    beta = np.linalg.pinv(x) @ y
    dof = x.shape[0] - np.linalg.matrix_rank(x)
    sigma2 = ((y - x @ beta) ** 2).sum(axis=0) / dof
    t = (c @ beta) / np.sqrt(sigma2 * (c @ np.linalg.pinv(x.T @ x) @ c))
    stat = np.asarray(nib.load(map_path(config, "sub-01_task-tiny", "a", "stat")).dataobj)
    np.testing.assert_allclose(stat[mask], t, rtol=1e-6, atol=1e-9)
