"""The AR(1) fast path against the general AR(p) path: the same solves and contrast
variances from one basis of the design, and the voxels it hands back flagged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bigglm.glm import ar
from bigglm.glm.ar1 import Ar1Basis, ar1_inverse_form, ar1_solve
from bigglm.glm.linalg import solve_psd


def _general_path(x: np.ndarray, phi: np.ndarray, rhs: np.ndarray, rank: int) -> np.ndarray:
    """``(X'QX)^+ rhs`` per voxel from the explicit whitened Gram (the AR(p) path)."""
    grams = np.stack([x.T @ x, x[1:].T @ x[:-1] + x[:-1].T @ x[1:]])
    top, bottom = ar.corner_correction(phi[None])
    gram = ar.whitened_gram(ar.band_coefficients(phi[None]), top, bottom, grams, x[:1], x[-1:])
    return solve_psd(gram, rhs.T[:, :, None], rank)[:, :, 0].T


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
    basis = Ar1Basis.build(x, rank)
    ours, ok = ar1_solve(basis, phi, rhs)
    assert ok.all()
    expected = _general_path(x, phi, rhs, rank)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    contrast = np.zeros((2, x.shape[1]))
    contrast[0, 0], contrast[1, :2] = 1.0, (1.0, -1.0)
    form, ok = ar1_inverse_form(basis, phi, contrast)
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
    _, ok = ar1_solve(Ar1Basis.build(x, 3), phi, np.ones((3, 4)))
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
