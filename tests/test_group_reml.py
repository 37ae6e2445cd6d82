"""The compiled REML's building blocks against numpy written plainly: the log-sum of
products (with factors far outside float64's comfortable range), the Jacobi eigen
decomposition, and the median of the present variances."""

from __future__ import annotations

import numpy as np
import pytest

from bigglm.group import reml
from bigglm.group.mixed import _median_present, fit_mixed


@pytest.mark.parametrize("scale", [1e-250, 1e-120, 1.0, 1e120, 1e250])
def test_log_sum_equals_the_sum_of_logs(scale: float) -> None:
    rng = np.random.default_rng(0)
    s = rng.gamma(2.0, 0.5, size=997) * scale
    s[[3, 40, 500]] = np.inf  # missing subjects are left out
    s[7] = 1e-300  # a factor below 1e-100 on its own
    tau2 = 0.25 * scale
    present = np.isfinite(s)
    expected = np.sum(np.log(tau2 + s[present]))
    # float64 sums of ~1000 logs of size up to ~575: 1e-13 relative covers the rounding
    assert reml._log_sum(tau2, s) == pytest.approx(expected, rel=1e-13, abs=1e-10)


def test_jacobi_eigh_equals_numpy() -> None:
    rng = np.random.default_rng(1)
    for p in (1, 2, 5, 9):
        a = rng.normal(size=(p, p + 3))
        matrix = a @ a.T
        matrix[0, 0] *= 1e6  # badly scaled
        values, vectors, work = np.empty(p), np.empty((p, p)), np.empty((p, p))
        reml._eigh(matrix, values, vectors, work)
        order = np.argsort(values)
        expected = np.linalg.eigvalsh(matrix)
        np.testing.assert_allclose(values[order], expected, rtol=1e-12, atol=1e-9 * expected[-1])
        rebuilt = (vectors * values) @ vectors.T
        np.testing.assert_allclose(rebuilt, matrix, rtol=0, atol=1e-12 * np.abs(matrix).max())


def test_median_of_present_variances_equals_nanmedian() -> None:
    rng = np.random.default_rng(2)
    v, n = 300, 41
    variance = rng.gamma(2.0, 0.5, size=(v, n))
    missing = rng.random((v, n)) < rng.uniform(0.0, 0.6, size=(v, 1))
    missing[0] = True  # nobody: NaN
    missing[1, 1:] = True  # one subject
    with_nan = np.where(missing, np.nan, variance)
    with pytest.warns(RuntimeWarning):
        expected = np.nanmedian(with_nan, axis=1)
    np.testing.assert_array_equal(_median_present(np.where(missing, np.inf, variance)), expected)


def test_float32_and_float64_inputs_give_one_fit() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=(30, 20)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, size=(30, 20)).astype(np.float32)
    x = np.column_stack([np.ones(30), rng.normal(size=30)])
    single, double = fit_mixed(y, s, x), fit_mixed(y.astype(np.float64), s.astype(np.float64), x)
    for key in ("beta", "tau2", "iterations"):
        np.testing.assert_array_equal(single[key], double[key])
