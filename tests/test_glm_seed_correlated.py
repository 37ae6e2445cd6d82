"""Seed 001 ("Correlated regressors") through the engine: 10,000 simulated voxels fitted
by bigglm.fit give the text's printed summaries, and the t statistic's denominator is
``sigma * sqrt(c'(X'X)^+ c)`` with the text's design factors 1.485 and 2.0861.

The text seeds numpy's legacy generator with 42 (``RandomState(42)`` is the same stream).
Tolerances: the summaries are printed with 12 significant digits (1e-9 absolute); the
design factors with 4-5 (half a unit of the last printed digit).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from seed_hrfs import seed_gamma_hrf

import bigglm

pytestmark = pytest.mark.usefixtures("threads_scheduler")


@pytest.fixture(scope="module")
def seed() -> dict[str, object]:
    legacy = np.random.RandomState(42)
    times = np.arange(0, 30, 2)
    hrf1 = seed_gamma_hrf(times)
    hrf2 = seed_gamma_hrf(times - 2)
    hrf1, hrf2 = hrf1 - hrf1.mean(), hrf2 - hrf2.mean()
    legacy.normal(size=times.shape)  # the text's single Y, drawn first
    ys = legacy.normal(size=(len(times), 10000)) + (hrf1 + hrf2)[:, None]
    ones = np.ones_like(hrf1)
    return {
        "run": xr.Dataset({"bold": (("time", "voxel"), ys)}).chunk({"time": 8, "voxel": 2500}),
        "one": pd.DataFrame({"hrf1": hrf1, "constant": ones}),
        "both": pd.DataFrame({"hrf1": hrf1, "hrf2": hrf2, "constant": ones}),
    }


def test_single_hrf_model_summaries(seed: dict) -> None:
    beta = bigglm.fit(seed["run"], seed["one"]).beta.sel(regressor="hrf1").values
    assert np.std(beta) == pytest.approx(1.47669405469, abs=1e-9)
    assert np.mean(beta) == pytest.approx(1.68134012906, abs=1e-9)


def test_both_hrf_model_summaries(seed: dict) -> None:
    result = bigglm.fit(seed["run"], seed["both"])
    b1 = result.beta.sel(regressor="hrf1").values
    b2 = result.beta.sel(regressor="hrf2").values
    assert (np.mean(b1), np.std(b1)) == pytest.approx((0.968933589198, 2.08274190893), abs=1e-9)
    assert (np.mean(b2), np.std(b2)) == pytest.approx((1.01451944676, 2.08038932821), abs=1e-9)
    assert np.corrcoef(b1, b2)[0, 1] == pytest.approx(-0.7052, abs=5e-5)


@pytest.mark.parametrize(
    "design,contrast,factor",
    [("one", "hrf1", 1.485), ("both", "hrf1", 2.0861), ("both", "hrf2", 2.0865)],
)
def test_t_denominator_is_sigma_times_the_design_factor(
    seed: dict, design: str, contrast: str, factor: float
) -> None:
    result = bigglm.fit(seed["run"], seed[design])
    con = result.contrast(contrast)
    scale = np.sqrt(con["variance"].values / result.sigma2.values)
    np.testing.assert_allclose(scale, factor, atol=5 * 10.0 ** -(len(str(factor)) - 1))
    t = con["effect"].values / np.sqrt(con["variance"].values)
    np.testing.assert_allclose(con["stat"].values, t, rtol=1e-12)
