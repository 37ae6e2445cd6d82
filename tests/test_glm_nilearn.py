"""bigglm against nilearn's FirstLevelModel on the same NIfTI, mask and design matrix.

* OLS: betas, t, z and effect variance agree to 1e-5 relative (both are exact OLS; the
  bound leaves room for nilearn's float32 masking of the data).
* AR(1): nilearn bins each voxel's coefficient down to a multiple of 0.01 and keeps the
  first scan unscaled (w_1 = y_1); bigglm uses each voxel's exact coefficient and
  Prais–Winsten. We show that nilearn's numbers are exactly a brute-force GLS with
  those two choices (1e-6), and that bigglm's z map correlates with nilearn's above
  0.999 with a small maximum difference (the size of the effect of a 0.01 change in
  the AR coefficient).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.signal
from nilearn.glm.first_level import FirstLevelModel

import bigglm

pytestmark = [
    pytest.mark.usefixtures("threads_scheduler"),
    pytest.mark.filterwarnings(
        "ignore:.*Generation of a mask has been requested",
        "ignore:The same contrast will be used",
    ),
]

SHAPE = (6, 5, 4)
TR = 2.0


def design_for(n_scans: int, seed: int) -> pd.DataFrame:
    """Two conditions, a cosine drift and the constant."""
    t = np.arange(n_scans)
    shift = seed % 3
    return pd.DataFrame(
        {
            "faces": ((t + shift) // 8 % 2 == 0).astype(float),
            "houses": ((t + shift) // 12 % 2 == 0).astype(float),
            "drift": np.cos(np.pi * (t + 0.5) / n_scans),
            "constant": 1.0,
        }
    )


def write_run(tmp: Path, name: str, n_scans: int, seed: int) -> tuple[Path, pd.DataFrame]:
    """A 4D float32 NIfTI of AR(1) noise plus design effects, mean 800."""
    rng = np.random.default_rng(seed)
    design = design_for(n_scans, seed)
    n_vox = int(np.prod(SHAPE))
    beta = rng.normal(size=(4, n_vox)) * [[2.0], [1.0], [3.0], [0.0]]
    phi = rng.uniform(0.1, 0.6, size=n_vox)
    white = rng.normal(size=(n_scans, n_vox))
    noise = np.column_stack(
        [scipy.signal.lfilter([1], [1, -p], w) for p, w in zip(phi, white.T, strict=True)]
    )
    y = 800.0 + design.to_numpy() @ beta + noise
    data = y.T.reshape(*SHAPE, n_scans).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_zooms((3.0, 3.0, 3.0, TR))
    path = tmp / f"{name}.nii.gz"
    nib.save(img, path)
    return path, design


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("nilearn")
    mask = np.zeros(SHAPE, bool)
    mask[1:5, 1:5, :] = True
    mask[2, 2, 0] = False
    mask_path = tmp / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.diag([3.0, 3.0, 3.0, 1.0])), mask_path)
    out: dict[str, object] = {
        "mask": mask,
        "mask_path": mask_path,
        "imgs": [],
        "designs": [],
        "stores": [],
    }
    for i, n_scans in enumerate((90, 110)):
        img, design = write_run(tmp, f"run{i}", n_scans, seed=i)
        store = bigglm.convert(
            img, tmp / f"run{i}.zarr", mask=mask_path, time_chunk=32, voxel_chunk=19
        )
        out["imgs"].append(img)  # type: ignore[attr-defined]
        out["designs"].append(design)  # type: ignore[attr-defined]
        out["stores"].append(store)  # type: ignore[attr-defined]
    return out


def nilearn_maps(runs: dict, noise: str, n_runs: int, contrast: str) -> dict[str, np.ndarray]:
    model = FirstLevelModel(
        noise_model=noise, signal_scaling=False, mask_img=runs["mask_path"], minimize_memory=False
    )
    model.fit(runs["imgs"][:n_runs], design_matrices=runs["designs"][:n_runs])
    maps = model.compute_contrast(contrast, output_type="all")
    out = {k: np.asarray(v.get_fdata())[runs["mask"]] for k, v in maps.items()}
    if n_runs == 1:
        betas = [
            model.compute_contrast(c, output_type="effect_size") for c in runs["designs"][0].columns
        ]
        out["beta"] = np.stack([np.asarray(b.get_fdata())[runs["mask"]] for b in betas])
    return out


def test_ols_matches_nilearn(runs: dict) -> None:
    expected = nilearn_maps(runs, "ols", 1, "faces - houses")
    result = bigglm.fit(runs["stores"][0], runs["designs"][0], noise="ols")
    con = result.contrast("faces - houses")
    np.testing.assert_allclose(result.beta.values, expected["beta"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(con["effect"].values, expected["effect_size"], rtol=1e-5)
    np.testing.assert_allclose(con["variance"].values, expected["effect_variance"], rtol=1e-5)
    np.testing.assert_allclose(con["stat"].values, expected["stat"], rtol=1e-5)
    np.testing.assert_allclose(con["z"].values, expected["z_score"], rtol=1e-5)
    np.testing.assert_allclose(con["p"].values, expected["p_value"], rtol=1e-5)


def test_ols_fixed_effects_over_two_runs_match_nilearn(runs: dict) -> None:
    expected = nilearn_maps(runs, "ols", 2, "faces - houses")
    con = bigglm.fit(runs["stores"], runs["designs"], noise="ols").contrast("faces - houses")
    np.testing.assert_allclose(con["effect"].values, expected["effect_size"], rtol=1e-5)
    np.testing.assert_allclose(con["variance"].values, expected["effect_variance"], rtol=1e-5)
    np.testing.assert_allclose(con["stat"].values, expected["stat"], rtol=1e-5)
    np.testing.assert_allclose(con["z"].values, expected["z_score"], rtol=1e-5)


def nilearn_style_ar1(x: np.ndarray, y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Brute-force t with nilearn's AR(1) choices, written from its source.

    Yule–Walker on the OLS residuals (1/(T-k) normalisation), the coefficient
    truncated to 0.01 bins (``int(rho * 100) / 100``), whitening ``w_1 = y_1`` and
    ``w_t = y_t - rho y_(t-1)``, then OLS on the whitened data.
    """
    n = len(x)
    out = []
    for v in range(y.shape[1]):
        e = y[:, v] - x @ np.linalg.lstsq(x, y[:, v], rcond=None)[0]
        rho = (e[1:] @ e[:-1] / (n - 1)) / (e @ e / n)
        rho = int(rho * 100) / 100
        w = np.eye(n) - rho * np.eye(n, k=-1)
        wx, wy = w @ x, w @ y[:, v]
        b = np.linalg.lstsq(wx, wy, rcond=None)[0]
        resid = wy - wx @ b
        sigma2 = resid @ resid / (n - x.shape[1])
        out.append(c @ b / np.sqrt(sigma2 * c @ np.linalg.pinv(wx.T @ wx) @ c))
    return np.array(out)


def test_ar1_differs_from_nilearn_by_its_binning_and_first_scan_only(runs: dict) -> None:
    expected = nilearn_maps(runs, "ar1", 1, "faces - houses")
    design = runs["designs"][0]
    y = bigglm.open_run(runs["stores"][0])["bold"].values.astype(np.float64)
    c = np.array([1.0, -1.0, 0.0, 0.0])
    # nilearn == brute force with its binned coefficient and unscaled first scan
    np.testing.assert_allclose(
        expected["stat"], nilearn_style_ar1(design.to_numpy(), y, c), rtol=1e-6
    )
    # bigglm (exact coefficients, Prais–Winsten) vs nilearn: close, not equal
    con = bigglm.fit(runs["stores"][0], design, noise="ar1").contrast("faces - houses")
    z, z_nl = con["z"].values, expected["z_score"]
    assert np.corrcoef(z, z_nl)[0, 1] > 0.9999  # observed 0.999998
    assert np.max(np.abs(z - z_nl)) < 0.1  # observed 0.034
    assert np.max(np.abs(z - z_nl)) > 1e-6  # the binning is visible: not the same model
