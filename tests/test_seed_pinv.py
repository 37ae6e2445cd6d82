"""Seed 000 ("Estimation for many voxels at the same time"): pinv(X) @ Y fits every
voxel in one multiply; betas have one row per regressor and one column per voxel.

The seed's numbers: the design is a linear trend from -1 to 1 over 12 scans plus a
constant; pinv(X) is 2 x 12 with first row -0.21 ... 0.21 and second row 0.08
everywhere (1/12), printed to 2 decimals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import bigglm

pytestmark = pytest.mark.usefixtures("threads_scheduler")


def seed_design() -> np.ndarray:
    x = np.ones((12, 2))
    x[:, 0] = np.linspace(-1, 1, 12)
    return x


def test_seed_pseudo_inverse_numbers() -> None:
    pinv = np.linalg.pinv(seed_design())
    assert pinv.shape == (2, 12)
    np.testing.assert_allclose(
        pinv[0].round(2),
        [-0.21, -0.17, -0.13, -0.1, -0.06, -0.02, 0.02, 0.06, 0.1, 0.13, 0.17, 0.21],
    )
    np.testing.assert_allclose(pinv[1].round(2), 0.08)


def test_fit_equals_pinv_times_y_row_per_regressor_column_per_voxel() -> None:
    x = seed_design()
    rng = np.random.default_rng()
    y = rng.normal(size=(12, 3))  # one column per voxel, as in the seed
    betas = np.linalg.pinv(x) @ y
    ds = xr.Dataset({"bold": (("time", "voxel"), y)}).chunk({"time": 5, "voxel": 2})
    result = bigglm.fit(ds, pd.DataFrame(x, columns=["slope", "intercept"])).compute()
    assert result.beta.dims == ("regressor", "voxel")
    assert result.beta.shape == (2, 3)  # one row per design column, one column per voxel
    np.testing.assert_allclose(result.beta.values, betas, rtol=1e-12, atol=1e-14)
    # row 0 is the slope (first design column), row 1 the intercept
    np.testing.assert_allclose(result.beta.sel(regressor="slope").values, betas[0], atol=1e-14)
    for v in range(3):  # the same as fitting each voxel on its own
        np.testing.assert_allclose(
            result.beta.values[:, v], np.linalg.pinv(x) @ y[:, v], atol=1e-14
        )


def test_seed_printed_data_give_the_printed_betas() -> None:
    """The seed's three printed data vectors and their printed betas (2 decimals)."""
    y = np.array(
        [
            [-0.27, 0.81, 0.87], [-1.37, -0.44, -0.81], [-0.84, 0.34, -2.19],
            [0.53, -0.25, -0.33], [0.42, -1.0, -1.35], [1.5, -1.52, 1.35],
            [-1.23, 1.38, -0.12], [-0.14, -1.84, 1.02], [-0.64, -0.32, -1.82],
            [1.54, -0.81, -1.57], [-1.94, -0.82, -0.67], [-1.33, 1.28, -1.47],
        ]
    )  # fmt: skip
    ds = xr.Dataset({"bold": (("time", "voxel"), y)})
    beta = bigglm.fit(ds, pd.DataFrame(seed_design(), columns=["slope", "intercept"])).beta
    # printed to 2 decimals from unrounded data, so agree to about 0.01
    np.testing.assert_allclose(
        beta.compute().values, [[-0.2, -0.12, -0.42], [-0.31, -0.27, -0.59]], atol=0.011
    )
