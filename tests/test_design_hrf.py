"""HRF kernels and convolution, against nilearn's kernels and numpy's convolution.

Tolerance: nilearn evaluates scipy's gamma density and bigglm the same formula written
out (scipy.stats is slow to import), so kernels agree to floating-point rounding; 1e-10 of
the kernel's largest magnitude is asserted.
"""

from __future__ import annotations

import numpy as np
import numpy.testing as npt
import pytest
from nilearn.glm.first_level import hemodynamic_models as nl

from bigglm.design import convolution_matrix, from_time_function, hrf
from bigglm.design.hemodynamic import _gamma_pdf, convolve_regressor, hrf_basis
from bigglm.exceptions import DesignError

NILEARN_KERNELS = {
    "spm": [nl.spm_hrf],
    "glover": [nl.glover_hrf],
    "spm + derivative": [nl.spm_hrf, nl.spm_time_derivative],
    "glover + derivative": [nl.glover_hrf, nl.glover_time_derivative],
    "spm + derivative + dispersion": [
        nl.spm_hrf,
        nl.spm_time_derivative,
        nl.spm_dispersion_derivative,
    ],
    "glover + derivative + dispersion": [
        nl.glover_hrf,
        nl.glover_time_derivative,
        nl.glover_dispersion_derivative,
    ],
}


def _close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    npt.assert_allclose(ours, theirs, rtol=0, atol=1e-10 * np.abs(theirs).max())


@pytest.mark.parametrize("model", sorted(NILEARN_KERNELS))
@pytest.mark.parametrize(
    ("tr", "oversampling", "time_length", "onset"),
    [(2.0, 50, 32.0, 0.0), (0.8, 16, 25.0, 0.0), (2.5, 1, 32.0, 0.0), (1.0, 10, 32.0, 1.5)],
)
def test_kernels_match_nilearn(
    model: str, tr: float, oversampling: int, time_length: float, onset: float
) -> None:
    ours = np.atleast_2d(hrf(model, tr, oversampling, time_length, onset))
    for row, function in zip(ours, NILEARN_KERNELS[model], strict=True):
        _close(row, function(tr, oversampling, time_length, onset))


def test_kernel_is_unit_sum_and_peaks_near_five_seconds() -> None:
    kernel = hrf("glover", 1.0, 100)
    assert kernel.sum() == pytest.approx(1.0)
    assert np.argmax(kernel) * 0.01 == pytest.approx(5.0, abs=0.5)


def test_fir_kernels_are_delayed_boxcars_of_unit_sum() -> None:
    kernels = hrf_basis("fir", 2.0, 4, fir_delays=[0, 2])
    npt.assert_array_equal(kernels[0], [0.25] * 4)
    npt.assert_array_equal(kernels[1], [0.0] * 8 + [0.25] * 4)


@pytest.mark.parametrize(
    ("model", "match"),
    [("fir", "fir_delays"), ("canonical", "unknown hrf model"), ("spm + dispersion", "unknown")],
)
def test_bad_models_raise(model: str, match: str) -> None:
    with pytest.raises(DesignError, match=match):
        hrf(model, 2.0)


def test_callable_with_wrong_signature_names_it() -> None:
    def by_time(times: np.ndarray) -> np.ndarray:
        return times

    with pytest.raises(DesignError, match="by_time"):
        hrf(by_time, 2.0)  # type: ignore[arg-type]


def test_from_time_function_samples_on_the_oversampled_grid() -> None:
    kernel = from_time_function(lambda t: t**8.6 * np.exp(-t / 0.547), time_length=20.0)
    values = kernel(2.0, 4)
    times = np.arange(0, 20.0, 0.5)
    expected = times**8.6 * np.exp(-times / 0.547)
    npt.assert_allclose(values, expected / expected.sum(), rtol=1e-12)


@pytest.mark.parametrize(("n", "m"), [(1, 1), (5, 3), (40, 20), (7, 12)])
def test_convolution_matrix_equals_numpy_convolve(n: int, m: int) -> None:
    rng = np.random.default_rng(n * 100 + m)
    signal, kernel = rng.normal(size=n), rng.normal(size=m)
    matrix = convolution_matrix(kernel, n)
    assert matrix.shape == (n, n + m - 1)
    npt.assert_allclose(signal @ matrix, np.convolve(signal, kernel), atol=1e-12)


def test_convolution_matrix_rejects_bad_input() -> None:
    with pytest.raises(DesignError, match="kernel"):
        convolution_matrix(np.ones((2, 2)), 3)
    with pytest.raises(DesignError, match="n=0"):
        convolution_matrix([1.0], 0)


@pytest.mark.parametrize("shape", [0.0, 0.5, 1.0, 2.5, 6.0, 6.0 / 0.9, 16.0, 40.0])
def test_gamma_density_equals_scipy(shape: float) -> None:
    """The written-out density is scipy.stats.gamma.pdf, at, before and after the onset."""
    from scipy.stats import gamma

    x = np.append(np.linspace(-2.0, 40.0, 4201), 0.2)  # and x == loc exactly
    expected = gamma.pdf(x, shape, loc=0.2, scale=0.9)
    ours = _gamma_pdf(x, shape, 0.2, 0.9)
    finite = np.isfinite(expected)
    npt.assert_array_equal(np.isnan(ours), np.isnan(expected))
    npt.assert_array_equal(np.isinf(ours), np.isinf(expected))
    if finite.any():
        scale = np.abs(expected[finite]).max()
        npt.assert_allclose(ours[finite], expected[finite], rtol=1e-12, atol=1e-14 * scale)


@pytest.mark.parametrize("n", [30, 20_000])
def test_fast_path_equals_direct_convolution(n: int) -> None:
    """FFT (long) and direct (short) paths both equal np.convolve truncated, to 1e-12."""
    rng = np.random.default_rng(n)
    signal = (rng.uniform(size=n) > 0.9).astype(float)
    kernel = hrf("spm", 2.0, 50)
    expected = np.convolve(signal, kernel)[:n]
    npt.assert_allclose(convolve_regressor(signal, kernel), expected, atol=1e-12)
