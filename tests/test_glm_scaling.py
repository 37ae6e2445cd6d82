"""SPM's global scaling (``bigglm.fit(..., scaling=...)``) and the per-scan globals stores record.

References: SPM12's own ``xGX.rg`` (the globals ``spm_global`` returned for the 250 scans
of the localizer) and ``xGX.gSF`` (the factors it applied) in ``SPM_v12.mat.gz``: the
session factor must equal SPM's to 1e-12 (one float64 mean and division). The globals
themselves are checked against a plain computation of SPM's documented definition on
the real BOLD (the mean of the voxels above an eighth of the scan's mean), to 1e-9
relative (float64 sums of the same float32 values in another order); SPM's ``rg`` came
from a cropped copy of these volumes, so they are not compared.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io
import xarray as xr

import bigglm
from bigglm.exceptions import DesignError

PEER = Path(__file__).resolve().parents[2] / "shared" / "peer-data"
LOCALIZER = PEER / "pyhrf_localizer"
BOLD = LOCALIZER / "subj0_bold_session0.nii.gz"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scaling")
    mask = nib.load(LOCALIZER / "subj0_parcellation.nii.gz")
    binary = folder / "mask.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), mask.affine), binary)
    return bigglm.convert(BOLD, folder / "run.zarr", mask=binary, tr=2.4, time_chunk=50)


def _design(n: int = 125) -> pd.DataFrame:
    t = np.arange(n) * 2.4
    return pd.DataFrame({"task": np.sin(2 * np.pi * t / 40.0), "constant": 1.0})


def test_store_records_spm_globals_of_whole_volumes(store: Path) -> None:
    data = np.asarray(nib.load(BOLD).dataobj, dtype=np.float64)
    expected = []
    for scan in range(data.shape[3]):
        volume = data[..., scan].ravel()
        expected.append(volume[volume > volume.mean() / 8].mean())
    recorded = bigglm.open_run(store).attrs["spm_global"]
    np.testing.assert_allclose(recorded, expected, rtol=1e-9)


def test_session_factor_is_spms_gsf() -> None:
    raw = gzip.open(LOCALIZER / "SPM_v12.mat.gz").read()
    spm = scipy.io.loadmat(io.BytesIO(raw), squeeze_me=True, struct_as_record=False)["SPM"]
    assert spm.xGX.iGXcalc == "None"  # SPM's default: session-wise grand mean scaling only
    rng = np.random.default_rng(0)
    for session in (0, 1):
        rows = np.asarray(spm.Sess[session].row) - 1
        ds = xr.Dataset(
            {"bold": (("time", "voxel"), 100 + rng.normal(size=(rows.size, 20)))},
            attrs={"spm_global": spm.xGX.rg[rows].tolist()},
        )
        result = bigglm.fit(ds, _design(rows.size), scaling="session")
        factor = result.runs[0].attrs["global_scaling"]["factor"]
        assert factor == pytest.approx(float(spm.xGX.gSF[rows][0]), rel=1e-12)
        np.testing.assert_allclose(spm.xGX.gSF[rows], factor, rtol=1e-12)


def test_session_scaling_scales_betas_not_t(store: Path) -> None:
    g = np.asarray(bigglm.open_run(store).attrs["spm_global"])
    plain = bigglm.fit(store, _design()).compute()
    scaled = bigglm.fit(store, _design(), scaling="session").compute()
    factor = 100 / g.mean()
    np.testing.assert_allclose(scaled.beta, plain.beta * factor, rtol=1e-9)
    np.testing.assert_allclose(scaled.sigma2, plain.sigma2 * factor**2, rtol=1e-9)
    t_plain = plain.contrast("task")["stat"].to_numpy()
    np.testing.assert_allclose(scaled.contrast("task")["stat"], t_plain, rtol=1e-9)


@pytest.mark.parametrize("noise", ["ols", "spm-ar1"])
def test_scan_scaling_fits_each_scan_divided_by_its_global(store: Path, noise: str) -> None:
    ds = bigglm.open_run(store)
    g = np.asarray(ds.attrs["spm_global"])
    by_hand = xr.Dataset({"bold": (("time", "voxel"), ds.bold.to_numpy() * (100 / g)[:, None])})
    expected = bigglm.fit(by_hand, _design(), noise=noise).contrast("task").compute()
    mine = bigglm.fit(store, _design(), noise=noise, scaling="scan").contrast("task").compute()
    np.testing.assert_allclose(mine["stat"], expected["stat"], rtol=1e-9)
    np.testing.assert_allclose(mine["effect"], expected["effect"], rtol=1e-9)


def test_scaling_without_globals_is_one_message() -> None:
    ds = xr.Dataset({"bold": (("time", "voxel"), np.ones((125, 3)) + np.arange(3))})
    with pytest.raises(DesignError, match=r"no usable per-scan globals.*convert the run again"):
        bigglm.fit(ds, _design(), scaling="session")
    with pytest.raises(DesignError, match=r"scaling='grand' is not known"):
        bigglm.fit(ds, _design(), scaling="grand")  # type: ignore[arg-type]


def test_config_scales_by_session_in_spm_conventions() -> None:
    from bigglm.config import ModelConfig

    assert ModelConfig(convention="spm12").global_scaling == "session"
    assert ModelConfig().global_scaling == "none"
    assert ModelConfig(convention="spm12", scaling="none").global_scaling == "none"
    assert ModelConfig(scaling="scan").global_scaling == "scan"
