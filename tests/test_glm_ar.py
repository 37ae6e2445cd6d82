"""AR(p) building blocks against statsmodels: Yule–Walker, the exact inverse covariance
(the whitening convention), and stationarity."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from statsmodels.regression.linear_model import yule_walker as sm_yule_walker
from statsmodels.tsa.arima_process import arma_acovf

from bigglm.glm import ar

PHIS = [(0.4,), (-0.7,), (0.5, -0.3), (0.3, 0.2, 0.1), (1.2, -0.5, 0.1, -0.05)]


@pytest.mark.parametrize("order", [1, 2, 4])
def test_yule_walker_matches_statsmodels_adjusted(order: int) -> None:
    rng = np.random.default_rng(order)
    series = rng.normal(size=(3, 64)).cumsum(axis=1) * 0.2 + rng.normal(size=(3, 64))
    lag_sums = np.array([[s[k:] @ s[: 64 - k] for s in series] for k in range(order + 1)])
    ours = ar.yule_walker(lag_sums, 64)
    for v, s in enumerate(series):
        expected, _ = sm_yule_walker(
            s, order=order, method="adjusted", demean=False, result_object=False
        )
        np.testing.assert_allclose(ours[:, v], expected, rtol=1e-10)


def banded_precision(phi: tuple[float, ...], n: int) -> np.ndarray:
    """Q assembled from the band and corner pieces, as the engine uses it."""
    coeffs = np.array(phi)[:, None]
    p = len(phi)
    band = ar.band_coefficients(coeffs)[:, 0]
    q = sum(band[m] * (np.eye(n, k=m) + (np.eye(n, k=-m) if m else 0)) for m in range(p + 1))
    top, bottom = ar.corner_correction(coeffs)
    q[:p, :p] += top[0]
    q[-p:, -p:] += bottom[0]
    return q


@pytest.mark.parametrize("phi", PHIS)
def test_whitening_is_the_exact_inverse_covariance(phi: tuple[float, ...]) -> None:
    """Q = sigma^2 Sigma^-1 for a stationary AR(p) with unit innovations (statsmodels' acovf)."""
    n = 15
    sigma = scipy.linalg.toeplitz(arma_acovf(np.r_[1.0, -np.array(phi)], [1.0], nobs=n))
    np.testing.assert_allclose(banded_precision(phi, n), np.linalg.inv(sigma), atol=1e-10)


def test_ar1_whitening_is_prais_winsten() -> None:
    r, n = 0.6, 9
    w = np.eye(n) - r * np.eye(n, k=-1)
    w[0, 0] = np.sqrt(1 - r**2)
    np.testing.assert_allclose(banded_precision((r,), n), w.T @ w, atol=1e-14)


@pytest.mark.parametrize("phi", [*PHIS, (1.1,), (0.5, 0.6), (0.2, 0.1, 0.9)])
def test_stationarity_matches_polynomial_roots(phi: tuple[float, ...]) -> None:
    roots = np.roots(np.r_[1.0, -np.array(phi)][::-1])  # of 1 - phi_1 z - ... - phi_p z^p
    expected = bool(np.all(np.abs(roots) > 1))
    assert ar.is_stationary(np.array(phi)[:, None])[0] == expected


def test_solve_psd_rank_deficient_is_the_pseudo_inverse() -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    x = np.column_stack([x, x[:, 0] + x[:, 1]])  # rank 3 of 4
    gram = (x.T @ x)[None]
    rhs = np.random.default_rng(1).normal(size=(1, 4, 2))
    np.testing.assert_allclose(
        ar.solve_psd(gram, rhs, rank=3)[0], np.linalg.pinv(gram[0]) @ rhs[0], rtol=1e-8
    )
