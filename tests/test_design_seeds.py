"""The teaching texts' examples (shared/seeds/000, 001, 003), number for number.

Tolerances: the texts print 4-5 significant digits, so printed values are compared at
half a unit of their last printed digit; identities the texts assert with
``np.allclose`` / ``assert_almost_equal`` are checked the same way.
"""

from __future__ import annotations

import numpy as np
import numpy.linalg as npl
import numpy.testing as npt
import pandas as pd
import pytest
from seed_hrfs import SEED_GAMMA, SEED_POWER, seed_gamma_hrf, seed_power_hrf

from bigglm.design import (
    contrast_scale,
    convolution_matrix,
    frame_times,
    make_design,
    orthogonalize,
)


@pytest.fixture(scope="module")
def correlated() -> dict[str, np.ndarray]:
    """Seed 001's setup, in its order of random draws.

    The text seeds numpy's legacy global generator with 42; ``RandomState(42)`` is the
    same stream, so its printed simulation summaries are reproducible.
    """
    legacy = np.random.RandomState(42)
    times = np.arange(0, 30, 2)
    hrf1 = seed_gamma_hrf(times)
    hrf2 = seed_gamma_hrf(times - 2)
    hrf1 = hrf1 - hrf1.mean()
    hrf2 = hrf2 - hrf2.mean()
    signal = hrf1 + hrf2
    noise = legacy.normal(size=times.shape)
    y = signal + noise
    ys = legacy.normal(size=(len(times), 10000)) + signal[:, None]
    return {"times": times, "hrf1": hrf1, "hrf2": hrf2, "Y": y, "Ys": ys}


def _designs(c: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    ones = np.ones_like(c["hrf1"])
    x_one = pd.DataFrame({"hrf1": c["hrf1"], "constant": ones})
    x_both = pd.DataFrame({"hrf1": c["hrf1"], "hrf2": c["hrf2"], "constant": ones})
    return x_one, x_both


def test_seed_hrf_correlation(correlated: dict[str, np.ndarray]) -> None:
    r = np.corrcoef(correlated["hrf1"], correlated["hrf2"])[0, 1]
    assert r == pytest.approx(0.7023, abs=5e-5)


def test_contrast_scale_numbers(correlated: dict[str, np.ndarray]) -> None:
    x_one, x_both = _designs(correlated)
    assert contrast_scale(x_one, [1, 0]) == pytest.approx(1.485, abs=5e-4)
    assert contrast_scale(x_both, [1, 0, 0]) == pytest.approx(2.0861, abs=5e-5)
    assert contrast_scale(x_both, [0, 1, 0]) == pytest.approx(2.0865, abs=5e-5)
    # the text's column-vector form and a {name: weight} mapping give the same value
    column = np.array([1, 0, 0])[:, None]
    assert contrast_scale(x_both, column) == contrast_scale(x_both, {"hrf1": 1.0})


def test_orthogonalized_model(correlated: dict[str, np.ndarray]) -> None:
    """hrf1 gets the single-model beta, hrf2's beta is unchanged (seed 001)."""
    x_one, x_both = _designs(correlated)
    x_orth = orthogonalize(x_both, "hrf2", "hrf1")
    ys = correlated["Ys"]
    b_ones = npl.pinv(x_one.to_numpy()) @ ys
    b_boths = npl.pinv(x_both.to_numpy()) @ ys
    b_orth = npl.pinv(x_orth.to_numpy()) @ ys
    npt.assert_allclose(b_orth[0], b_ones[0], atol=1e-10)
    npt.assert_allclose(b_orth[1], b_boths[1], atol=1e-10)
    # hrf1 part of hrf2 plus the unique part is hrf2; the text's 0.7022
    part = x_both["hrf2"] - x_orth["hrf2"]
    coef = float(part @ x_both["hrf1"]) / float(x_both["hrf1"] @ x_both["hrf1"])
    assert coef == pytest.approx(0.7022, abs=5e-5)
    npt.assert_allclose(part, coef * x_both["hrf1"], atol=1e-12)
    assert contrast_scale(x_orth, [1, 0, 0]) == pytest.approx(1.485, abs=5e-4)
    # the simulation's printed summaries (legacy np.random.seed(42) stream)
    assert np.std(b_ones[0]) == pytest.approx(1.47669405469, abs=1e-9)
    assert np.mean(b_ones[0]) == pytest.approx(1.68134012906, abs=1e-9)
    npt.assert_allclose(b_ones[:, :5], [[2.5395, -1.7854, 0.1398, 1.6884, 4.5348],
                                        [-0.1606, -0.0069, 0.3315, -0.1837, -0.2644]],
                        atol=5e-5)  # fmt: skip
    assert np.corrcoef(b_orth[0], b_orth[1])[0, 1] == pytest.approx(-0.0053, abs=5e-5)


def test_pinv_rows_are_regressors() -> None:
    """Seed 000: pinv(X) has one row per regressor; betas one column per voxel."""
    x = pd.DataFrame({"slope": np.linspace(-1, 1, 12), "constant": 1.0})
    pix = npl.pinv(x.to_numpy())
    assert pix.shape == (2, 12)
    npt.assert_allclose(pix[1], 1 / 12)  # the constant row averages the data
    npt.assert_allclose(np.round(pix[0, :3], 2), [-0.21, -0.17, -0.13])
    y = np.random.default_rng(0).normal(size=(12, 3))
    betas = pix @ y
    for voxel in range(3):
        npt.assert_allclose(betas[:, voxel], pix @ y[:, voxel])
    assert contrast_scale(x, [0, 1]) == pytest.approx(np.sqrt(1 / 12))


@pytest.fixture(scope="module")
def neural() -> tuple[np.ndarray, np.ndarray]:
    """Seed 003's neural signal and 1-second HRF."""
    signal = np.zeros(40)
    signal[4:7] = 1
    signal[10] = 1
    signal[20] = 3
    return signal, seed_power_hrf(np.arange(20))


def test_convolution_matrix_identities(neural: tuple[np.ndarray, np.ndarray]) -> None:
    signal, kernel = neural
    shifted = convolution_matrix(kernel, signal.size)
    assert shifted.shape == (40, 40 + 20 - 1)
    bold = np.convolve(signal, kernel)
    npt.assert_almost_equal(signal[None, :] @ shifted, bold[None, :])
    npt.assert_almost_equal((shifted.T @ signal[:, None]).T, bold[None, :])
    npt.assert_almost_equal(signal @ shifted[:, 25], bold[25])
    # column i holds the reversed HRF: S[j, i] == h[i - j]
    i = 25
    npt.assert_array_equal(shifted[i - 19 : i + 1, i], kernel[::-1])
    npt.assert_array_equal(shifted[: i - 19, i], 0.0)


def test_seed_hrfs_work_in_make_design() -> None:
    """Both seed HRFs as ``hrf=``: a long block plateaus at 1 (unit-sum kernels)."""
    events = pd.DataFrame({"onset": [10.0], "duration": [60.0], "trial_type": ["block"]})
    times = frame_times(60, 1.0)
    for model, name in [(SEED_GAMMA, "block_seed_gamma"), (SEED_POWER, "block_seed_power")]:
        x = make_design(times, events, hrf=model, drift=None)
        assert list(x.columns) == [name, "constant"]
        assert x[name].iloc[45] == pytest.approx(1.0, abs=1e-3)
        assert x[name].iloc[:10].abs().max() < 1e-12  # before the event (FFT rounding)
