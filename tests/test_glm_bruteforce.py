"""bigglm.fit against plain per-voxel numpy: whiten each voxel with its own AR
coefficients and solve least squares, one voxel at a time.

Tolerance 1e-6 relative (the brief's): the engine gets the same numbers from sums of
chunk statistics instead of the whitened series, so they differ by float64 rounding
only (observed ~1e-11 on data with a mean of 1,000).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg
import scipy.signal
from ar_simulation import as_run, simulate, yule_walker
from statsmodels.tsa.arima_process import arma_acovf

import bigglm

pytestmark = pytest.mark.usefixtures("threads_scheduler")


RTOL = 1e-6


def brute_force(x: np.ndarray, y: np.ndarray, order: int) -> dict[str, np.ndarray]:
    """Per voxel: OLS, Yule–Walker on its residuals, exact whitening, lstsq."""
    n, p = x.shape
    betas, sigma2, phis = [], [], []
    for v in range(y.shape[1]):
        yv = y[:, v].astype(np.float64)
        b = np.linalg.lstsq(x, yv, rcond=None)[0]
        if order == 0:
            w = np.eye(n)
            phi = np.zeros(0)
        elif order == 1:
            (r,) = phi = yule_walker(yv - x @ b, 1)
            w = np.eye(n) - r * np.eye(n, k=-1)  # w_t = y_t - r y_(t-1)
            w[0, 0] = np.sqrt(1 - r**2)  # Prais–Winsten first row
        else:
            phi = yule_walker(yv - x @ b, order)
            cov = scipy.linalg.toeplitz(arma_acovf(np.r_[1, -phi], [1], nobs=n))
            w = np.linalg.inv(np.linalg.cholesky(cov))  # w' w = cov^-1
        bw, *_ = np.linalg.lstsq(w @ x, w @ yv, rcond=None)
        resid = w @ yv - w @ x @ bw
        betas.append(bw)
        sigma2.append(resid @ resid / (n - p))
        phis.append(phi)
    return {"beta": np.array(betas).T, "sigma2": np.array(sigma2), "ar": np.array(phis).T}


def t_brute(x: np.ndarray, y: np.ndarray, order: int, c: np.ndarray) -> np.ndarray:
    """t = c b / sqrt(sigma2 c (W X)'(W X)^-1 c'), per voxel, from the whitened design."""
    fit = brute_force(x, y, order)
    out = []
    for v in range(y.shape[1]):
        if order == 0:
            wx = x
        else:
            phi = fit["ar"][:, v]
            cov = scipy.linalg.toeplitz(arma_acovf(np.r_[1, -phi], [1], nobs=len(x)))
            wx = np.linalg.inv(np.linalg.cholesky(cov)) @ x
        var = fit["sigma2"][v] * c @ np.linalg.inv(wx.T @ wx) @ c
        out.append(c @ fit["beta"][:, v] / np.sqrt(var))
    return np.array(out)


@pytest.mark.parametrize("noise,order", [("ols", 0), ("ar1", 1), ("ar2", 2)])
def test_fit_matches_per_voxel_whitened_lstsq(noise: str, order: int) -> None:
    design, y = simulate(phi=(0.5, -0.2) if order == 2 else (0.4,))
    result = bigglm.fit(as_run(y), design, noise=noise).compute()
    expected = brute_force(design.to_numpy(), y, order)
    np.testing.assert_allclose(result.beta.values, expected["beta"], rtol=RTOL)
    np.testing.assert_allclose(result.sigma2.values, expected["sigma2"], rtol=RTOL)
    if order:
        np.testing.assert_allclose(result.ar.values, expected["ar"], rtol=RTOL)
    assert float(result.dof) == len(design) - design.shape[1]


@pytest.mark.parametrize("noise,order", [("ols", 0), ("ar1", 1), ("ar2", 2)])
def test_t_contrast_matches_brute_force(noise: str, order: int) -> None:
    design, y = simulate(seed=3, phi=(0.3, 0.2) if order == 2 else (0.3,))
    con = bigglm.fit(as_run(y), design, noise=noise).contrast("faces - houses")
    expected = t_brute(design.to_numpy(), y, order, np.array([1.0, -1.0, 0.0, 0.0]))
    np.testing.assert_allclose(con["stat"].values, expected, rtol=RTOL)


@pytest.mark.parametrize("noise", ["ols", "ar1"])
def test_large_mean_float32_stays_accurate(noise: str) -> None:
    """BOLD near 10,000 with noise SD 1, stored as float32 (the cancellation trap).

    The reference is the float64 brute force on the same float32 values (its
    residuals are formed directly, accurate to ~1e-12 relative). A one-pass
    ``Y'Y - b'X'Y`` without the per-voxel offset loses ~8 of float64's 16 digits: on
    these data its sigma2 is off by 7e-8 relative, so 1e-9 tells the two apart.
    """
    design, y = simulate(mean=10_000.0, sd=1.0, seed=5, n_scans=128)
    assert y.dtype == np.float32
    order = 1 if noise == "ar1" else 0
    result = bigglm.fit(as_run(y, (40, 7)), design, noise=noise).compute()
    expected = brute_force(design.to_numpy(), y, order)
    np.testing.assert_allclose(result.sigma2.values, expected["sigma2"], rtol=1e-9)
    np.testing.assert_allclose(result.beta.values, expected["beta"], rtol=1e-9)
    if order:
        np.testing.assert_allclose(result.ar.values, expected["ar"], rtol=1e-9)


def test_constant_voxels_are_nan_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    design, y = simulate(n_vox=10)
    y[:, [2, 7]] = np.float32(1234.5)
    with caplog.at_level(logging.WARNING, logger="bigglm.glm.result"):
        result = bigglm.fit(as_run(y, (30, 4)), design, noise="ar1").compute()
    con = result.contrast("faces")
    assert np.isnan(con["stat"].values[[2, 7]]).all()
    assert np.isnan(con["z"].values[[2, 7]]).all()
    assert np.isfinite(np.delete(con["z"].values, [2, 7])).all()
    assert result.runs[0].attrs["n_constant"] == 2
    assert "2 constant voxels" in caplog.text


def test_ar_order_higher_than_two_matches_exact_gls() -> None:
    design, y = simulate(phi=(0.3, 0.1, 0.1), n_vox=6, seed=9)
    result = bigglm.fit(as_run(y, (20, 3)), design, noise="ar3").compute()
    expected = brute_force(design.to_numpy(), y, 3)
    np.testing.assert_allclose(result.beta.values, expected["beta"], rtol=RTOL)
    np.testing.assert_allclose(result.sigma2.values, expected["sigma2"], rtol=RTOL)


@pytest.mark.parametrize("noise,order", [("ols", 0), ("ar1", 1), ("ar2", 2)])
def test_rank_deficient_design_gives_minimum_norm_betas(noise: str, order: int) -> None:
    """Conditions that sum to the constant (rank 4 of 5): betas are lstsq's minimum-norm ones."""
    design, y = simulate(n_vox=8, seed=2)
    design = design.assign(other=1.0 - design["faces"])  # faces + other = constant
    result = bigglm.fit(as_run(y, (25, 3)), design, noise=noise).compute()
    expected = brute_force(design.to_numpy(), y, order)
    np.testing.assert_allclose(result.beta.values, expected["beta"], rtol=RTOL, atol=1e-9)
    dof = len(design) - 4
    assert float(result.dof) == dof
    n_cols = design.shape[1]  # brute_force divides by T - P; rescale to T - rank
    np.testing.assert_allclose(
        result.sigma2.values, expected["sigma2"] * (len(design) - n_cols) / dof, rtol=RTOL
    )


@pytest.mark.parametrize("noise,order", [("ols", 0), ("ar2", 2)])
def test_f_contrast_matches_brute_force(noise: str, order: int) -> None:
    """F = (Cb)' [C (X~'X~)^-1 C']^-1 (Cb) / (q sigma2), per voxel from whitened lstsq."""
    design, y = simulate(seed=8, n_vox=10, phi=(0.4, 0.1))
    c = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    result = bigglm.fit(as_run(y, (21, 4)), design, noise=noise)
    got = result.contrast(["faces", "houses"], kind="F")["stat"].values
    fit = brute_force(design.to_numpy(), y, order)
    x = design.to_numpy()
    expected = []
    for v in range(y.shape[1]):
        if order:
            acov = arma_acovf(np.r_[1, -fit["ar"][:, v]], [1], nobs=len(x))
            w = np.linalg.inv(np.linalg.cholesky(scipy.linalg.toeplitz(acov)))
        else:
            w = np.eye(len(x))
        cov = c @ np.linalg.inv((w @ x).T @ (w @ x)) @ c.T
        cb = c @ fit["beta"][:, v]
        expected.append(cb @ np.linalg.solve(cov, cb) / (2 * fit["sigma2"][v]))
    np.testing.assert_allclose(got, expected, rtol=RTOL)
