"""AR(p) building blocks against statsmodels: Yule–Walker, the exact inverse covariance
(the whitening convention), and stationarity."""

from __future__ import annotations

import dataclasses
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


def test_solve_psd_rank_deficient_is_the_pseudo_inverse() -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    x = np.column_stack([x, x[:, 0] + x[:, 1]])  # rank 3 of 4
    gram = (x.T @ x)[None]
    rhs = np.random.default_rng(1).normal(size=(1, 4, 2))
    np.testing.assert_allclose(
        ar.solve_psd(gram, rhs, rank=3)[0], np.linalg.pinv(gram[0]) @ rhs[0], rtol=1e-8
    )


def _general_path(x: np.ndarray, phi: np.ndarray, rhs: np.ndarray, rank: int) -> np.ndarray:
    """``(X'QX)^+ rhs`` per voxel from the explicit whitened Gram (the AR(p) path)."""
    grams = np.stack([x.T @ x, x[1:].T @ x[:-1] + x[:-1].T @ x[1:]])
    top, bottom = ar.corner_correction(phi[None])
    gram = ar.whitened_gram(ar.band_coefficients(phi[None]), top, bottom, grams, x[:1], x[-1:])
    return ar.solve_psd(gram, rhs.T[:, :, None], rank)[:, :, 0].T


@pytest.mark.parametrize("deficient", [False, True])
def test_ar1_basis_solve_matches_the_whitened_gram(deficient: bool) -> None:
    """The O(P^2) AR(1) solve equals the P x P whitened-Gram solve (pseudo-inverse if
    the design is rank-deficient), for coefficients across (-1, 1)."""
    rng = np.random.default_rng(3)
    t = np.arange(60)
    x = np.column_stack([np.sin(t / 5), (t // 6 % 2).astype(float), t / 60, np.ones(60)])
    if deficient:
        x = np.column_stack([x, x[:, 1] + x[:, 3]])
    rank = np.linalg.matrix_rank(x)
    phi = np.array([-0.95, -0.5, 0.0, 0.3, 0.7, 0.99, 0.999])
    rhs = x.T @ rng.normal(size=(60, phi.size))
    basis = ar.Ar1Basis.build(x, rank)
    ours, ok = ar.ar1_solve(basis, phi, rhs)
    assert ok.all()
    expected = _general_path(x, phi, rhs, rank)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    contrast = np.zeros((2, x.shape[1]))
    contrast[0, 0], contrast[1, :2] = 1.0, (1.0, -1.0)
    form, ok = ar.ar1_inverse_form(basis, phi, contrast)
    assert ok.all()
    cols = _general_path(x, phi, np.repeat(contrast.T[:, :, None], phi.size, axis=2)[:, 0], rank)
    np.testing.assert_allclose(form[0, 0], contrast[0] @ cols, rtol=1e-9)
    both = np.stack([_general_path(x, phi, np.tile(c[:, None], phi.size), rank) for c in contrast])
    np.testing.assert_allclose(form, np.einsum("ia,jav->ijv", contrast, both), rtol=1e-9)


def test_ar1_basis_flags_coefficients_next_to_one_for_the_general_path() -> None:
    """phi a hair below 1 (a near-singular 2 x 2 Woodbury system for a design with slow
    regressors) is flagged, and finish and contrast fall back to the general path for
    those voxels; elsewhere, also for phi next to -1 or beyond 1, the two agree.

    Tolerance: two correct solvers given inputs that differ by rounding (the fast path
    derives the lagged cross products; the batches differ) agree to about the whitened
    Gram's condition number times that rounding, ~1e-14 relative here: the tolerance,
    relative to the largest entry per voxel, is
    ``cond * 1e-14`` per voxel, 1e-13 for the well-conditioned voxels and 4.5e-7 for
    phi = 1 - 1e-7 (condition number 4.5e7)."""
    from bigglm.glm import finish
    from bigglm.glm.stats import DesignTerms, chunk_statistics

    t = np.arange(80)
    x = np.column_stack([np.cos(np.pi * (t + 0.5) / 80), (t // 8 % 2).astype(float), np.ones(80)])
    phi = np.array([0.5, 1 - 1e-7, -(1 - 1e-9), 1.5])
    _, ok = ar.ar1_solve(ar.Ar1Basis.build(x, 3), phi, np.ones((3, 4)))
    np.testing.assert_array_equal(ok, [True, False, True, True])
    terms = DesignTerms.build(x, order=1)
    general = dataclasses.replace(terms, ar1=None)
    contrast = np.array([[0.0, 1.0, 0.0]])
    np.testing.assert_allclose(
        finish.ar_contrast_variance(terms, phi[None], contrast),
        finish.ar_contrast_variance(general, phi[None], contrast),
        rtol=1e-7,
    )
    band, (top, bottom) = ar.band_coefficients(phi[None]), ar.corner_correction(phi[None])
    gram = ar.whitened_gram(band, top, bottom, terms.lag_gram, x[:1], x[-1:])
    rtol = np.linalg.cond(gram) * 1e-14
    assert rtol[1] > 1e-7 > rtol[[0, 2, 3]].max()  # only the flagged voxel is ill-conditioned
    y = np.random.default_rng(4).normal(size=(80, 4)).cumsum(axis=0)
    total = chunk_statistics(y, np.zeros(4), terms, 0)
    rotated = finish._ar1_rotated(total, terms, terms.ar1)
    for ours, expected in zip(
        finish._ar1_gls(total, rotated, phi[None], terms, terms.ar1),
        finish._gls(total, terms.lag_cross(total), phi[None], general),
        strict=True,
    ):
        # normwise per voxel (a small entry's error scales with the whole solution)
        size = np.abs(expected).max(axis=0) if expected.ndim == 2 else np.abs(expected)
        assert np.all(np.abs(ours - expected) <= rtol * size)


def test_cholesky_solve_matches_lapack_and_flags_indefinite_matrices() -> None:
    """The voxel-last Cholesky solve equals numpy's per-matrix solve on positive definite
    matrices (also badly scaled ones) and flags matrices that are not."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(30, 7, 50))
    gram = np.einsum("vai,vbi->abv", a, a) + 1e-3 * np.eye(7)[:, :, None]
    scale = 10.0 ** rng.uniform(-4, 4, size=(7, 1))
    gram = gram * scale[:, None] * scale[None]
    gram[:, :, 3] = np.diag([1.0, -1.0, 1, 1, 1, 1, 1])  # indefinite
    rhs = rng.normal(size=(7, 2, 30))
    solution, ok = ar.cholesky_solve(gram, rhs)
    assert ok.tolist() == [v != 3 for v in range(30)]
    expected = np.linalg.solve(gram.transpose(2, 0, 1), rhs.transpose(2, 0, 1)).transpose(1, 2, 0)
    np.testing.assert_allclose(solution[:, :, ok], expected[:, :, ok], rtol=1e-9)


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
