"""fit_mixed against plain per-voxel oracles: a brute-force REML (scipy's bounded scalar
and L-BFGS-B minimisers on the restricted likelihood written out, then numpy least
squares), statsmodels OLS when the first-level variances are 0, and the fixed-effects
weighted fit when the between-subject variance is 0."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import statsmodels.api as sm

from bigglm.exceptions import DesignError
from bigglm.group.mixed import fit_mixed, reml_loglik

# --- the oracle: one voxel at a time, missing subjects dropped ----------------------


def reml_objective(tau2: np.ndarray, y: np.ndarray, s: np.ndarray, x: np.ndarray) -> float:
    """REML negative log-likelihood, ``tau2`` one value per subject."""
    w = 1.0 / (tau2 + s)
    gram = x.T @ (w[:, None] * x)
    beta = np.linalg.solve(gram, x.T @ (w * y))
    r = y - x @ beta
    return 0.5 * (np.sum(np.log(tau2 + s)) + np.linalg.slogdet(gram)[1] + np.sum(w * r * r))


def wls(y: np.ndarray, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares by lstsq on the rescaled rows: beta and (X'WX)^-1."""
    root = np.sqrt(w)
    beta = np.linalg.lstsq(root[:, None] * x, root * y, rcond=None)[0]
    return beta, np.linalg.inv(x.T @ (w[:, None] * x))


def brute_reml_1d(y: np.ndarray, s: np.ndarray, x: np.ndarray) -> float:
    """Bounded Brent on [0, hi], then the boundary tau2 = 0 if it is at least as good."""
    hi = 10.0 * (np.var(y) + s.max()) + 1.0
    res = scipy.optimize.minimize_scalar(
        lambda t: reml_objective(np.full_like(s, t), y, s, x),
        bounds=(0.0, hi),
        method="bounded",
        options={"xatol": 1e-13 * hi, "maxiter": 2000},
    )
    at_zero = reml_objective(np.zeros_like(s), y, s, x)
    return 0.0 if at_zero <= res.fun else float(res.x)


def brute_reml_groups(y: np.ndarray, s: np.ndarray, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """L-BFGS-B on tau2 >= 0 from several starts, the best, polished by Nelder-Mead."""
    k = int(g.max()) + 1
    spread = np.var(y) + np.median(s)

    def objective(t: np.ndarray) -> float:
        return reml_objective(t[g], y, s, x)

    bounds = [(0.0, 20.0 * spread)] * k
    best = None
    corners = [2.0 * np.eye(k)[j] for j in range(k)] + [2.0 - 2.0 * np.eye(k)[j] for j in range(k)]
    for start in [np.full(k, c) for c in (0.1, 1.0, 3.0)] + corners:
        res = scipy.optimize.minimize(
            objective,
            start * spread,
            method="L-BFGS-B",
            bounds=bounds,
            options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None
    res = scipy.optimize.minimize(
        objective,
        best.x,
        method="Nelder-Mead",
        bounds=bounds,
        options={"xatol": 1e-12 * spread, "fatol": 1e-15, "maxiter": 4000},
    )
    return np.asarray(res.x if res.fun <= best.fun else best.x)


def assert_within(actual: np.ndarray, expected: np.ndarray, bound: np.ndarray) -> None:
    """``|actual - expected| <= bound`` elementwise (an array-valued absolute tolerance)."""
    error = np.abs(np.asarray(actual) - expected)
    assert np.all(error <= bound), f"{actual} != {expected}: error {error}, bound {bound}"


def t_value(c: np.ndarray, beta: np.ndarray, covariance: np.ndarray) -> float:
    return float(c @ beta / np.sqrt(c @ covariance @ c))


def bigglm_t(fit: dict[str, np.ndarray], c: np.ndarray) -> np.ndarray:
    """t of contrast ``c`` at every voxel from fit_mixed's beta, gram and scale."""
    inverse = np.linalg.inv(fit["gram"].transpose(2, 0, 1))
    variance = fit["scale"] * np.einsum("i,vij,j->v", c, inverse, c)
    return (c @ fit["beta"]) / np.sqrt(variance)


# --- data ----------------------------------------------------------------------------


def simulate(
    n: int = 48,
    v: int = 50,
    seed: int = 0,
    tau2: np.ndarray | None = None,
    s_scale: float = 1.0,
    missing: float = 0.25,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intercept, a continuous covariate, a two-level factor; heteroscedastic s; holes.

    ``tau2`` is (k, v) (k variance groups, ``groups`` the subjects' codes) or, by
    default, one group with true values from 0 (the boundary) to 4 across the voxels.
    """
    rng = np.random.default_rng(seed)
    age = rng.normal(size=n)
    level = (np.arange(n) % 2).astype(float)
    x = np.column_stack([np.ones(n), age, level])
    if tau2 is None:
        tau2 = np.tile([0.0, 0.0, 0.05, 0.3, 1.0, 4.0], v)[None, :v]
    codes = np.zeros(n, dtype=int) if groups is None else groups
    s = s_scale * rng.gamma(2.0, 0.5, size=(n, v)) * rng.uniform(0.2, 3.0, size=(n, 1))
    beta = rng.normal(size=(3, v)) * [[2.0], [0.5], [1.0]]
    y = x @ beta + rng.normal(size=(n, v)) * np.sqrt(tau2[codes] + s)
    holes = rng.random((n, v)) < rng.uniform(0.0, missing, size=v)
    y[holes] = np.nan
    s[rng.random((n, v)) < 0.02] = np.nan  # a missing variance also drops the subject
    return y.astype(np.float32), s.astype(np.float32), x


def present(y: np.ndarray, s: np.ndarray, voxel: int) -> np.ndarray:
    return np.isfinite(y[:, voxel]) & np.isfinite(s[:, voxel])


# --- tests ---------------------------------------------------------------------------


def test_equals_brute_force_reml() -> None:
    y, s, x = simulate()
    fit = fit_mixed(y, s, x)
    contrasts = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert fit["converged"].all()
    assert np.unique(fit["n"]).size > 5  # missing subjects: n varies across voxels
    assert (fit["tau2"] == 0).any() and (fit["tau2"] > 0).any()
    for voxel in range(y.shape[1]):
        keep = present(y, s, voxel)
        yv, sv, xv = (a.astype(np.float64) for a in (y[keep, voxel], s[keep, voxel], x[keep]))
        tau2 = brute_reml_1d(yv, sv, xv)
        beta, covariance = wls(yv, 1.0 / (tau2 + sv), xv)
        # Brent's minimiser is good to about sqrt(eps) of tau2 + s where the likelihood is
        # flat, so tau2 is compared on the scale tau2 + median s, and beta and t (which
        # move by that relative amount) to 1e-6 relative, beta's zero by its standard error.
        assert fit["tau2"][0, voxel] == pytest.approx(
            tau2, rel=0, abs=1e-6 * (tau2 + np.median(sv))
        )
        se = np.sqrt(np.diag(covariance))
        assert_within(fit["beta"][:, voxel], beta, 1e-6 * (np.abs(beta) + se))
        for c in contrasts:
            t = t_value(c, beta, covariance)
            assert bigglm_t(fit, c)[voxel] == pytest.approx(t, rel=1e-6, abs=1e-9)
        assert fit["n"][voxel] == keep.sum() and fit["dof"][voxel] == keep.sum() - 3
    assert (fit["rank"] == 3).all() and (fit["scale"] == 1.0).all()


def test_reml_loglik_is_the_restricted_likelihood() -> None:
    y, s, x = simulate(v=6, seed=1)
    tau2 = np.array([[0.0, 0.1, 0.5, 1.0, 2.0, 5.0]])
    loglik = reml_loglik(tau2, y, s, x)
    for voxel in range(y.shape[1]):
        keep = present(y, s, voxel)
        yv, sv, xv = (a.astype(np.float64) for a in (y[keep, voxel], s[keep, voxel], x[keep]))
        oracle = -reml_objective(np.full_like(sv, tau2[0, voxel]), yv, sv, xv)
        assert loglik[voxel] == pytest.approx(oracle, rel=1e-12)


def test_zero_first_level_variance_is_ols() -> None:
    y, s, x = simulate(v=8, seed=2)
    fit = fit_mixed(y, np.where(np.isnan(s), np.nan, 0.0), x)
    assert fit["converged"].all()
    for voxel in range(y.shape[1]):
        keep = present(y, s, voxel)
        ols = sm.OLS(y[keep, voxel].astype(np.float64), x[keep]).fit()
        # W = I / tau2 and REML's tau2 is the residual mean square RSS / (n - p)
        assert fit["tau2"][0, voxel] == pytest.approx(ols.scale, rel=1e-8)
        np.testing.assert_allclose(fit["beta"][:, voxel], ols.params, rtol=1e-8, atol=1e-10)
        for j, c in enumerate(np.eye(3)):
            assert bigglm_t(fit, c)[voxel] == pytest.approx(ols.tvalues[j], rel=1e-8)


def test_no_between_subject_variance_reaches_zero_and_is_fixed_effects() -> None:
    y, s, x = simulate(v=40, seed=3, tau2=np.zeros((1, 40)), s_scale=4.0)
    fit = fit_mixed(y, s, x)
    boundary = np.flatnonzero(fit["tau2"][0] == 0.0)
    assert boundary.size >= 10 and fit["converged"].all()
    for voxel in boundary:
        keep = present(y, s, voxel)
        yv, sv, xv = (a.astype(np.float64) for a in (y[keep, voxel], s[keep, voxel], x[keep]))
        beta, covariance = wls(yv, 1.0 / sv, xv)
        np.testing.assert_allclose(fit["beta"][:, voxel], beta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fit["gram"][:, :, voxel], np.linalg.inv(covariance), rtol=1e-10)
        assert brute_reml_1d(yv, sv, xv) == 0.0  # the oracle finds the boundary too


def test_variance_groups_equal_brute_force_2d_reml() -> None:
    n, v = 48, 12
    codes = (np.arange(n) // 3) % 2  # not sorted: the kernel sorts rows by group itself
    truth = np.array([[0.3, 0.0, 1.0] * 4, [3.0, 1.0, 0.0] * 4])
    y, s, x = simulate(n=n, v=v, seed=4, tau2=truth, groups=codes)
    fit = fit_mixed(y, s, x, groups=codes)
    assert fit["tau2"].shape == (2, v) and fit["converged"].all()
    assert (fit["tau2"] == 0).any()
    for voxel in range(v):
        keep = present(y, s, voxel)
        yv, sv, xv = (a.astype(np.float64) for a in (y[keep, voxel], s[keep, voxel], x[keep]))
        tau2 = brute_reml_groups(yv, sv, xv, codes[keep])
        # the 2-D minimisers stop near sqrt(eps) of the scale, as Brent does
        scale = tau2 + np.median(sv)
        assert_within(fit["tau2"][:, voxel], tau2, 1e-5 * scale)
        mine = reml_objective(fit["tau2"][codes[keep], voxel], yv, sv, xv)
        assert mine <= reml_objective(tau2[codes[keep]], yv, sv, xv) + 1e-9
        beta, _ = wls(yv, 1.0 / (tau2[codes[keep]] + sv), xv)
        np.testing.assert_allclose(fit["beta"][:, voxel], beta, rtol=1e-5, atol=1e-5)


def test_knapp_hartung_scale_is_the_weighted_residual_mean_square() -> None:
    y, s, x = simulate(v=10, seed=5)
    plain, scaled = fit_mixed(y, s, x), fit_mixed(y, s, x, knapp_hartung=True)
    np.testing.assert_array_equal(scaled["beta"], plain["beta"])
    for voxel in range(y.shape[1]):
        keep = present(y, s, voxel)
        yv, sv, xv = (a.astype(np.float64) for a in (y[keep, voxel], s[keep, voxel], x[keep]))
        w = 1.0 / (scaled["tau2"][0, voxel] + sv)
        beta, _ = wls(yv, w, xv)
        q = np.sum(w * (yv - xv @ beta) ** 2) / (keep.sum() - 3)
        assert scaled["scale"][voxel] == pytest.approx(q, rel=1e-10)


def test_bad_input_is_a_design_error() -> None:
    y, s, x = simulate(v=4, seed=6)
    negative = s.copy()
    negative[5, 2] = -0.1
    with pytest.raises(DesignError, match="negative"):
        fit_mixed(y, negative, x)
    with pytest.raises(DesignError, match="same shape"):
        fit_mixed(y, s[:, :3], x)
    with pytest.raises(DesignError, match="one row per subject"):
        fit_mixed(y, s, x[:-1])
    with pytest.raises(DesignError, match="group codes"):
        fit_mixed(y, s, x, groups=np.full(x.shape[0], 1))
    with pytest.raises(DesignError, match="one integer code per subject"):
        fit_mixed(y, s, x, groups=np.zeros(x.shape[0] - 1, dtype=int))
    with pytest.raises(DesignError, match="infinite"):
        fit_mixed(np.where(np.isnan(y), np.inf, y), s, x)


def test_voxels_without_residual_dof_are_nan_without_warnings() -> None:
    y, s, x = simulate(v=4, seed=7, missing=0.0)
    s = np.nan_to_num(s, nan=1.0)
    y[3:, 1] = np.nan  # 3 subjects for 3 columns: n - rank = 0
    y[:, 2] = np.nan  # nobody
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_mixed(y, s, x, knapp_hartung=True)
    for key in ("beta", "tau2"):
        assert np.isnan(fit[key][:, [1, 2]]).all() and np.isfinite(fit[key][:, [0, 3]]).all()
    assert np.isnan(fit["scale"][[1, 2]]).all() and np.isfinite(fit["scale"][[0, 3]]).all()
    np.testing.assert_array_equal(fit["n"], [x.shape[0], 3, 0, x.shape[0]])
    np.testing.assert_array_equal(fit["rank"], [3, 3, 0, 3])
    np.testing.assert_array_equal(fit["dof"], [x.shape[0] - 3, 0, 0, x.shape[0] - 3])
    np.testing.assert_array_equal(fit["converged"], [True, False, False, True])


def test_units_do_not_change_the_fit() -> None:
    y, s, x = simulate(v=20, seed=8)
    base = fit_mixed(y, s, x)
    for unit in (1e-3, 1e3):  # effects in other units: variances by unit^2
        fit = fit_mixed(y.astype(np.float64) * unit, s.astype(np.float64) * unit**2, x)
        np.testing.assert_allclose(fit["tau2"], base["tau2"] * unit**2, rtol=1e-9, atol=0)
        np.testing.assert_allclose(fit["beta"], base["beta"] * unit, rtol=1e-9, atol=1e-12 * unit)
        np.testing.assert_array_equal(fit["iterations"], base["iterations"])


def test_a_redundant_column_gives_the_same_fit() -> None:
    y, s, x = simulate(v=10, seed=9)
    base = fit_mixed(y, s, x)
    redundant = np.column_stack([x, 2.0 * x[:, 2]])  # rank 3 of 4 columns
    fit = fit_mixed(y, s, redundant)
    np.testing.assert_array_equal(fit["rank"], 3)
    np.testing.assert_array_equal(fit["dof"], base["dof"])
    np.testing.assert_allclose(fit["tau2"], base["tau2"], rtol=1e-9, atol=1e-12)
    group = fit["beta"][2] + 2.0 * fit["beta"][3]  # the estimable group difference
    np.testing.assert_allclose(group, base["beta"][2], rtol=1e-9, atol=1e-12)


def test_three_groups_near_their_bounds_converge() -> None:
    # Groups pulled to 0 while another's optimum is interior: a step clamped after the
    # solve stalled on a few dozen voxels of 3000 before the active-set step.
    n, v = 120, 1500
    codes = np.arange(n) % 3
    truth = np.random.default_rng(1).choice([0.0, 0.02, 0.3], size=(3, v))
    y, s, x = simulate(n=n, v=v, seed=12, tau2=truth, groups=codes)
    fit = fit_mixed(y, s, x, groups=codes)
    assert fit["converged"].all() and (fit["tau2"] == 0).any()
    for voxel in np.argsort(fit["iterations"])[-3:]:  # the slowest ones, against the oracle
        keep = present(y, s, voxel)
        yv, sv, xv = (a.astype(np.float64) for a in (y[keep, voxel], s[keep, voxel], x[keep]))
        tau2 = brute_reml_groups(yv, sv, xv, codes[keep])
        assert_within(fit["tau2"][:, voxel], tau2, 1e-5 * (tau2 + np.median(sv)))
