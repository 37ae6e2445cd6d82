"""Mixed effects through bigglm.group.fit, from files on disk to contrasts, against a plain
per-voxel REML (scipy's bounded scalar minimiser of the REML criterion, then weighted
least squares) of exactly the subjects present at each voxel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from group_maps import subject_maps
from scipy import optimize, stats

from bigglm.exceptions import DesignError
from bigglm.group import GroupResult, collect, fit, open_group

pytestmark = pytest.mark.usefixtures("threads_scheduler")


def _reml(y: np.ndarray, s: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """tau2, beta and cov(beta) of one voxel by a direct REML written plainly."""

    def criterion(tau2: float) -> float:
        w = 1.0 / (tau2 + s)
        a = x.T @ (w[:, None] * x)
        beta = np.linalg.solve(a, x.T @ (w * y))
        r = y - x @ beta
        return 0.5 * (np.sum(np.log(tau2 + s)) + np.linalg.slogdet(a)[1] + np.sum(w * r**2))

    top = 10.0 * (np.var(y) + s.max())
    found = optimize.minimize_scalar(
        criterion, bounds=(0.0, top), method="bounded", options={"xatol": 1e-12 * top}
    )
    tau2 = 0.0 if criterion(0.0) <= found.fun else float(found.x)
    w = 1.0 / (tau2 + s)
    a = x.T @ (w[:, None] * x)
    return tau2, np.linalg.solve(a, x.T @ (w * y)), np.linalg.inv(a)


def _dataset(n: int, v: int, seed: int) -> tuple[xr.Dataset, pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    subjects = [f"sub-{i:02d}" for i in range(n)]
    age = rng.uniform(-10, 10, n)
    x = pd.DataFrame({"intercept": 1.0, "age": age}, index=subjects)
    s = rng.uniform(0.2, 3.0, (n, v))
    tau2 = rng.choice([0.0, 0.3, 2.0], v)
    y = 0.5 + 0.05 * age[:, None] + rng.normal(size=(n, v)) * np.sqrt(tau2 + s)
    y[rng.random((n, v)) < 0.15] = np.nan
    s[np.isnan(y)] = np.nan
    ds = xr.Dataset(
        {"effect": (("subject", "voxel"), y), "variance": (("subject", "voxel"), s)},
        coords={"subject": subjects},
    )
    return ds, x, tau2


def test_mixed_fit_equals_a_plain_reml_per_voxel() -> None:
    ds, x, _ = _dataset(40, 30, seed=1)
    res = fit(ds, x, model="mixed")
    out = res.contrast("age")
    y, s = ds.effect.values, ds.variance.values
    at_zero = 0
    for v in range(y.shape[1]):
        keep = np.isfinite(y[:, v])
        tau2, beta, cov = _reml(y[keep, v], s[keep, v], x.to_numpy()[keep])
        at_zero += tau2 == 0.0
        # 1e-6: REML optimum found two ways (Fisher scoring vs bounded Brent search)
        assert float(res.tau2[0, v]) == pytest.approx(tau2, rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(res.beta.values[:, v], beta, rtol=1e-6, atol=1e-9)
        t = beta[1] / np.sqrt(cov[1, 1])
        assert float(out["stat"][v]) == pytest.approx(t, rel=1e-6)
        dof = keep.sum() - 2
        assert float(out["dof"][v]) == dof
        assert float(out["p"][v]) == pytest.approx(stats.t.sf(t, dof), rel=1e-5)
    assert at_zero >= 3  # the boundary tau2 = 0 is reached where REML's optimum is there
    assert res.n.values.tolist() == np.isfinite(y).sum(axis=0).tolist()


def test_knapp_hartung_scales_the_covariance() -> None:
    ds, x, _ = _dataset(30, 10, seed=2)
    plain, adjusted = fit(ds, x, model="mixed"), fit(ds, x, model="mixed", knapp_hartung=True)
    y, s = ds.effect.values, ds.variance.values
    for v in range(3):
        keep = np.isfinite(y[:, v])
        xv = x.to_numpy()[keep]
        tau2 = float(plain.tau2[0, v])
        w = 1.0 / (tau2 + s[keep, v])
        r = y[keep, v] - xv @ plain.beta.values[:, v]
        q = np.sum(w * r**2) / (keep.sum() - 2)
        assert float(adjusted.sigma2[v]) == pytest.approx(q, rel=1e-8)
        ratio = adjusted.contrast("age")["variance"][v] / plain.contrast("age")["variance"][v]
        assert float(ratio) == pytest.approx(q, rel=1e-8)


def test_variance_groups_give_one_tau2_per_group() -> None:
    ds, x, _ = _dataset(40, 5, seed=3)
    x["site"] = np.where(np.arange(40) < 20, "a", "b")
    res = fit(ds, x[["intercept", "age"]], model="mixed", variance_groups=x["site"])
    assert res.tau2.dims == ("variance_group", "voxel") and res.tau2.shape == (2, 5)
    with pytest.raises(DesignError, match="model='mixed' only"):
        fit(ds, x[["intercept", "age"]], variance_groups=x["site"])


def test_mixed_from_files_round_trips_and_needs_variances(tmp_path: Path) -> None:
    effects, variances, _, _ = subject_maps(tmp_path / "maps", 10, seed=4, shrink=True)
    store = collect(effects, tmp_path / "g.zarr", variances=variances, chunks=(4, 128))
    subjects = open_group(store).subject.values.tolist()
    x = pd.DataFrame({"intercept": 1.0}, index=subjects)
    res = fit(store, x, model="mixed")
    assert res.dataset.attrs["model"] == "mixed"
    back = GroupResult.from_zarr(res.to_zarr(tmp_path / "mixed.zarr"))
    np.testing.assert_array_equal(back.tau2.values, res.tau2.values)
    z = back.contrast("intercept")["z"].values
    assert np.isfinite(z).sum() == int(np.isfinite(res.sigma2.values).sum())
    no_variance = collect(effects, tmp_path / "e.zarr")
    with pytest.raises(DesignError, match="needs the first-level variances"):
        fit(no_variance, x, model="mixed")


@pytest.mark.cluster
def test_mixed_fit_on_a_local_cluster_equals_fit_in_process(tmp_path: Path, local_client) -> None:
    effects, variances, _, _ = subject_maps(tmp_path / "maps", 9, seed=6, shrink=True)
    store = collect(effects, tmp_path / "g.zarr", variances=variances, chunks=(4, 100))
    x = pd.DataFrame({"intercept": 1.0}, index=open_group(store).subject.values.tolist())
    here = fit(store, x, model="mixed")
    there = fit(store, x, model="mixed", client=local_client)
    for key in ("beta", "tau2", "sigma2", "dof", "n"):
        np.testing.assert_array_equal(here.dataset[key].values, there.dataset[key].values)
