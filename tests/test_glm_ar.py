"""AR(p) building blocks against statsmodels: Yule–Walker, the exact inverse covariance
(the whitening convention), and stationarity."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pandas as pd
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


@pytest.mark.parametrize("deficient", [False, True])
def test_general_solve_matches_the_pseudo_inverse(deficient: bool) -> None:
    """AR(2): the Cholesky path (full rank) and the eigen path (rank-deficient, and any
    voxel Cholesky refuses) both give (X'QX)^+ rhs."""
    from bigglm.glm import finish
    from bigglm.glm.stats import DesignTerms

    t = np.arange(60)
    x = np.column_stack([np.sin(t / 5), (t // 6 % 2).astype(float), np.ones(60)])
    if deficient:
        x = np.column_stack([x, x[:, 1] + x[:, 2]])
    terms = DesignTerms.build(x, order=2)
    phi = np.array([[0.5, 0.2, -0.3, 0.9], [-0.3, 0.1, 0.2, -0.5]])
    rhs = np.random.default_rng(6).normal(size=(x.shape[1], 2, 4))
    top, bottom = ar.corner_correction(phi)
    gram = ar.whitened_gram(ar.band_coefficients(phi), top, bottom, terms.lag_gram, x[:2], x[-2:])
    expected = np.einsum("vab,bkv->akv", np.linalg.pinv(gram, hermitian=True), rhs)
    np.testing.assert_allclose(finish._general_solve(terms, phi, rhs), expected, rtol=1e-8)


@pytest.mark.parametrize(
    ("drift", "order", "expected_probes"),
    [
        # cosine drifts and the constant: (L^m + F^m) of each is in the design's span
        # plus terms on the first and last m scans, so only the 2 task columns per lag
        # are multiplied by the data
        ("cosine", 1, 2),
        ("cosine", 3, 6),
        # orthogonalised polynomials: (t - m)^k + (t + m)^k is a polynomial of degree k
        ("polynomial", 2, 4),
    ],
)
def test_lagged_cross_products_derived_from_the_design_equal_direct_products(
    drift: str, order: int, expected_probes: int
) -> None:
    """The lagged cross products ``((L^m + F^m) X)' Y`` a fit needs are exactly those of a
    direct product (to 1e-12 of their scale) when the drift and constant terms are
    derived from X' Y and the run's first and last rows, over chunks and their
    combination; a column that is no such combination (the smooth confound here) is
    multiplied by the data like the task columns."""
    from bigglm import design
    from bigglm.glm.stats import DesignTerms, chunk_statistics, combine

    rng = np.random.default_rng(order)
    events = pd.DataFrame(
        {"onset": [10.0, 50, 90, 130], "duration": 8.0, "trial_type": ["a", "b", "a", "b"]}
    )
    times = design.frame_times(120, 1.5)
    frame = design.make_design(times, events, drift=drift, drift_order=3)
    terms = DesignTerms.build(frame.to_numpy(), order)
    assert terms.probes.shape[0] == frame.shape[1] + expected_probes
    confound = np.sin(times / 17.0) + 0.1 * rng.normal(size=times.size)
    with_confound = DesignTerms.build(np.column_stack([frame.to_numpy(), confound]), order)
    assert with_confound.probes.shape[0] == frame.shape[1] + 1 + expected_probes + order

    for each in (terms, with_confound):
        y = 1000 + rng.normal(size=(120, 7)).cumsum(axis=0)
        offset = y[0]
        cuts = [0, 25, 26, 70, 120]  # uneven chunks, one of a single scan (order <= 1)
        if order > 1:
            cuts = [0, 25, 70, 120]
        parts = [chunk_statistics(y[lo:hi], offset, each, lo) for lo, hi in pairwise(cuts)]
        derived = each.lag_cross(combine(parts))
        direct = np.einsum("mta,tv->mav", each.lag_design, y - offset)
        # the bound on either product's size: sum_t |x_t| max|y|
        scale = np.abs(each.lag_design).sum(axis=1)[:, :, None] * np.abs(y - offset).max()
        assert np.max(np.abs(derived - direct) / scale) < 1e-12
