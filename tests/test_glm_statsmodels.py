"""bigglm's t and F tests against statsmodels OLS on single voxels.

statsmodels fits each voxel on its own with a QR/pinv least-squares solver; bigglm gets
the same numbers from chunked sums. Tolerance 1e-8 relative: both are float64 OLS.
statsmodels' t-test p is two-sided; bigglm's is the upper tail (as nilearn), so the
two-sided p is ``2 min(p, 1 - p)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import xarray as xr

import bigglm

pytestmark = pytest.mark.usefixtures("threads_scheduler")


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(11)
    n = 80
    t = np.arange(n)
    design = pd.DataFrame(
        {
            "a": (t // 5 % 2).astype(float),
            "b": np.sin(t / 7.0),
            "c": rng.normal(size=n),
            "constant": 1.0,
        }
    )
    y = 50 + design.to_numpy() @ rng.normal(size=(4, 6)) + rng.normal(size=(n, 6))
    return design, y


@pytest.fixture(scope="module")
def result(data: tuple[pd.DataFrame, np.ndarray]) -> bigglm.GLMResult:
    design, y = data
    ds = xr.Dataset({"bold": (("time", "voxel"), y)}).chunk({"time": 25, "voxel": 4})
    return bigglm.fit(ds, design).compute()


@pytest.mark.parametrize("voxel", [0, 3, 5])
def test_t_test_matches_statsmodels(data: tuple, result: bigglm.GLMResult, voxel: int) -> None:
    design, y = data
    reference = sm.OLS(y[:, voxel], design).fit().t_test([1.0, -0.5, 0.0, 0.0])
    con = result.contrast("a - 0.5*b").isel(voxel=voxel)
    np.testing.assert_allclose(float(con["effect"]), reference.effect[0], rtol=1e-8)
    np.testing.assert_allclose(np.sqrt(float(con["variance"])), reference.sd[0, 0], rtol=1e-8)
    np.testing.assert_allclose(float(con["stat"]), reference.tvalue[0, 0], rtol=1e-8)
    p = float(con["p"])
    np.testing.assert_allclose(2 * min(p, 1 - p), reference.pvalue, rtol=1e-8)
    assert float(con["dof"]) == reference.df_denom


@pytest.mark.parametrize("voxel", [1, 2])
def test_f_test_matches_statsmodels(data: tuple, result: bigglm.GLMResult, voxel: int) -> None:
    design, y = data
    reference = sm.OLS(y[:, voxel], design).fit().f_test(np.eye(4)[:3])
    con = result.contrast(["a", "b", "c"], kind="F").isel(voxel=voxel)
    np.testing.assert_allclose(float(con["stat"]), reference.fvalue, rtol=1e-8)
    np.testing.assert_allclose(float(con["p"]), reference.pvalue, rtol=1e-6)
    assert float(con["dof"]) == reference.df_denom


def test_betas_and_residual_variance_match_statsmodels(
    data: tuple, result: bigglm.GLMResult
) -> None:
    design, y = data
    for voxel in range(y.shape[1]):
        reference = sm.OLS(y[:, voxel], design).fit()
        np.testing.assert_allclose(result.beta.values[:, voxel], reference.params, rtol=1e-8)
        np.testing.assert_allclose(result.sigma2.values[voxel], reference.scale, rtol=1e-8)
