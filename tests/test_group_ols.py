"""Group OLS against references no one here wrote: nilearn's SecondLevelModel on the same
files, statsmodels OLS on single voxels, and a brute-force per-voxel fit of exactly the
subjects present at each voxel."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import xarray as xr
from group_maps import subject_maps
from scipy import stats

from bigglm.exceptions import DesignError
from bigglm.group import GroupResult, collect, design, fit, open_group

pytestmark = pytest.mark.usefixtures("threads_scheduler")


def _participants(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i + 1:03d}" for i in range(n)],
            "age": rng.uniform(20, 60, n).round(1),
            "group": np.where(np.arange(n) % 3 == 0, "patient", "control"),
        }
    )


def test_one_sample_and_covariate_equal_nilearn_second_level(tmp_path: Path) -> None:
    from nilearn.glm.second_level import SecondLevelModel

    effects, _, _, _ = subject_maps(tmp_path / "maps", 16, seed=1, with_variance=False)
    store = collect(effects, tmp_path / "g.zarr")
    table = _participants(16)
    x = design(table, ["intercept", "age"], center=False)
    res = fit(store, x)
    mask_img = nib.Nifti1Image(open_group(store)["mask"].values.astype(np.uint8), np.eye(4))
    mask_img = nib.Nifti1Image(mask_img.get_fdata().astype(np.uint8), nib.load(effects[0]).affine)
    model = SecondLevelModel(mask_img=mask_img, smoothing_fwhm=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's own deprecation notices
        model.fit([str(p) for p in effects], design_matrix=x.reset_index(drop=True))
        maps = {c: model.compute_contrast(c, output_type="all") for c in ("intercept", "age")}
    mask = open_group(store)["mask"].values
    for name, theirs in maps.items():
        ours = res.contrast(name)
        for key, stat in (("stat", "stat"), ("z", "z_score"), ("effect", "effect_size")):
            expected = theirs[stat].get_fdata()[mask]
            # 1e-6 relative: both fit in float64 from the same float32 values; nilearn
            # masks through its masker (float32 again), so the last digits may differ
            np.testing.assert_allclose(ours[key].values, expected, rtol=1e-6, atol=1e-9)


def test_two_groups_plus_age_equal_statsmodels_on_single_voxels(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n, v = 30, 40
    table = _participants(n, seed=2)
    x = design(table, "1 + age + C(group)")
    y = rng.normal(size=(n, v)) + 0.05 * table["age"].to_numpy()[:, None]
    ds = xr.Dataset({"effect": (("subject", "voxel"), y)}, coords={"subject": x.index})
    res = fit(ds, x)
    t = res.contrast("`C(group)[T.patient]`")
    f = res.contrast(["age", "`C(group)[T.patient]`"], kind="F")
    for voxel in (0, 7, 39):
        ols = sm.OLS(y[:, voxel], x.to_numpy()).fit()
        # 1e-8: the same float64 normal equations in another order of summation
        np.testing.assert_allclose(res.beta.values[:, voxel], ols.params, rtol=1e-8)
        np.testing.assert_allclose(float(t["stat"][voxel]), ols.tvalues[2], rtol=1e-8)
        np.testing.assert_allclose(
            float(t["p"][voxel]),
            ols.pvalues[2] / 2 if ols.tvalues[2] > 0 else 1 - ols.pvalues[2] / 2,
            rtol=1e-8,
        )
        test = ols.f_test(np.eye(3)[1:])
        np.testing.assert_allclose(float(f["stat"][voxel]), float(test.fvalue), rtol=1e-8)
        np.testing.assert_allclose(float(f["p"][voxel]), float(test.pvalue), rtol=1e-8)
        assert float(res.dof[voxel]) == ols.df_resid


def _brute_force(y: np.ndarray, x: np.ndarray, c: np.ndarray, min_subjects: int) -> dict:
    """Each voxel on its own: lstsq on the subjects whose value is finite there."""
    out = {k: np.full(y.shape[1], np.nan) for k in ("t", "effect", "dof", "p")}
    out["n"] = np.isfinite(y).sum(axis=0)
    for v in range(y.shape[1]):
        keep = np.isfinite(y[:, v])
        xv, yv = x[keep], y[keep, v]
        rank = np.linalg.matrix_rank(xv)
        if keep.sum() < min_subjects or keep.sum() - rank < 1:
            continue
        beta = np.linalg.pinv(xv) @ yv
        dof = keep.sum() - rank
        sigma2 = np.sum((yv - xv @ beta) ** 2) / dof
        # estimable at this voxel: c lies in the row space of the voxel's design
        if not np.allclose(c @ np.linalg.pinv(xv) @ xv, c, atol=1e-8):
            continue
        variance = sigma2 * c @ np.linalg.pinv(xv.T @ xv) @ c
        out["effect"][v] = c @ beta
        out["t"][v] = c @ beta / np.sqrt(variance)
        out["dof"][v] = dof
        out["p"][v] = stats.t.sf(out["t"][v], dof)
    return out


def test_each_voxel_is_the_fit_of_the_subjects_present_there() -> None:
    rng = np.random.default_rng(7)
    n, v = 25, 300
    table = _participants(n, seed=5)
    x = design(table, ["group", "age"])  # one column per group, centred age
    y = rng.normal(size=(n, v))
    y[rng.random((n, v)) < rng.uniform(0, 0.6, v)] = np.nan  # each voxel its own missingness
    y[: n - 3, 0] = np.nan  # 3 subjects: below min_subjects
    y[np.asarray(table["group"] == "patient"), 1] = np.nan  # no patient: contrast not estimable
    ds = xr.Dataset({"effect": (("subject", "voxel"), y)}, coords={"subject": x.index})
    res = fit(ds.chunk({"subject": 7, "voxel": 64}), x, min_subjects=6)
    c = np.array([-1.0, 1.0, 0.0])
    out = res.contrast("group_patient - group_control")
    expected = _brute_force(y, x.to_numpy(), c, 6)
    np.testing.assert_array_equal(res.n.values, expected["n"])
    assert len(np.unique(res.dof.values[np.isfinite(res.sigma2.values)])) > 5  # dof varies
    for key, ours in (("t", out["stat"]), ("effect", out["effect"]), ("p", out["p"])):
        # 1e-9: sufficient statistics in float64 against a direct lstsq of each voxel
        np.testing.assert_allclose(ours.values, expected[key], rtol=1e-9, atol=1e-12)
    assert np.isnan(res.sigma2.values[0]) and res.n.values[0] <= 3
    assert np.isfinite(res.sigma2.values[1]) and np.isnan(out["stat"].values[1])
    assert out.attrs["n_not_estimable"] == 1
    assert res.dataset.attrs["n_not_fitted"] == int(np.sum(expected["n"] < 6))


def test_min_subjects_default_and_fraction() -> None:
    subjects = [f"s{i}" for i in range(10)]
    y = np.ones((10, 3)) + np.random.default_rng(0).normal(size=(10, 3))
    y[:7, 0] = np.nan  # 3 subjects
    y[:6, 1] = np.nan  # 4 subjects
    ds = xr.Dataset({"effect": (("subject", "voxel"), y)}, coords={"subject": subjects})
    x = pd.DataFrame({"intercept": 1.0, "z": np.arange(10.0)}, index=subjects)
    default = fit(ds, x)  # rank 2 + 2 = 4 subjects at least
    assert np.isnan(default.sigma2.values[0]) and np.isfinite(default.sigma2.values[1])
    half = fit(ds, x, min_subjects=0.5)
    assert np.isnan(half.sigma2.values[:2]).all() and np.isfinite(half.sigma2.values[2])
    for bad in (0, -1, 1.5, "3", True):
        with pytest.raises(DesignError, match="min_subjects"):
            fit(ds, x, min_subjects=bad)  # type: ignore[arg-type]


def test_design_and_store_must_hold_the_same_subjects() -> None:
    subjects = ["a", "b", "c", "d"]
    ds = xr.Dataset(
        {"effect": (("subject", "voxel"), np.ones((4, 2)))}, coords={"subject": subjects}
    )
    with pytest.raises(DesignError, match="maps without a participants row: d"):
        fit(ds, pd.DataFrame({"intercept": 1.0}, index=["a", "b", "c"]))
    with pytest.raises(DesignError, match="participants rows without maps: e"):
        fit(ds, pd.DataFrame({"intercept": 1.0}, index=[*subjects, "e"]))
    with pytest.raises(DesignError, match="'c' has no value for 'age'"):
        fit(ds, pd.DataFrame({"age": [1.0, 2.0, np.nan, 3.0]}, index=subjects))
    with pytest.raises(DesignError, match="model="):
        fit(ds, pd.DataFrame({"intercept": 1.0}, index=subjects), model="flame")  # type: ignore[arg-type]
    with pytest.raises(DesignError, match="needs the first-level variances"):
        fit(ds, pd.DataFrame({"intercept": 1.0}, index=subjects), model="mixed")


def test_result_round_trips_through_zarr_and_writes_maps(tmp_path: Path) -> None:
    effects, _, truth, _ = subject_maps(
        tmp_path / "maps", 8, seed=2, shrink=True, with_variance=False
    )
    store = collect(effects, tmp_path / "g.zarr")
    x = design(_participants(8), ["intercept"])
    res = fit(store, x)
    back = GroupResult.from_zarr(res.to_zarr(tmp_path / "res.zarr"))
    np.testing.assert_array_equal(back.beta.values, res.beta.values)
    assert back.columns == ["intercept"]
    paths = back.to_nifti(tmp_path / "maps-out", {"mean": "intercept"})
    names = sorted(p.name for p in paths)
    assert "group_contrast-mean_stat-t_statmap.nii.gz" in names
    z = nib.load(tmp_path / "maps-out" / "group_contrast-mean_stat-z_statmap.nii.gz").get_fdata()
    expected = res.contrast("intercept")["z"].values
    mask = open_group(store)["mask"].values
    np.testing.assert_allclose(z[mask], expected, rtol=1e-6)
    assert np.isnan(z[~mask]).all()
    mean = np.nanmean(truth[:, mask], axis=0)
    np.testing.assert_allclose(res.beta.values[0], mean, rtol=1e-5)


@pytest.mark.cluster
def test_fit_on_a_local_cluster_equals_fit_in_process(tmp_path: Path, local_client) -> None:
    effects, _, _, _ = subject_maps(tmp_path / "maps", 9, seed=3, shrink=True, with_variance=False)
    store = collect(effects, tmp_path / "g.zarr", chunks=(4, 100))
    x = design(_participants(9), ["intercept", "age"])
    here, there = fit(store, x), fit(store, x, client=local_client)
    for key in ("beta", "sigma2", "dof", "n"):
        np.testing.assert_array_equal(here.dataset[key].values, there.dataset[key].values)
