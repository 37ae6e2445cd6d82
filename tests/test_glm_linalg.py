"""serial_matmul: the same product as ``a @ b`` whatever the shapes and output layout;
the batched solves: numpy's per-matrix solve or pseudo-inverse, voxel by voxel."""

from __future__ import annotations

import numpy as np
import pytest

from bigglm.glm.linalg import cholesky_solve, serial_matmul, solve_psd


@pytest.mark.parametrize("shape", [(38, 128, 5000), (19, 19, 1), (3, 19, 70000), (2, 2, 0)])
def test_serial_matmul_is_the_product(shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(m, k)), rng.normal(size=(k, n))
    np.testing.assert_allclose(serial_matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(serial_matmul(a.T.copy().T, b[:, ::-1]), a @ b[:, ::-1], atol=1e-12)


@pytest.mark.parametrize("order", ["C", "F"])
def test_serial_matmul_writes_into_a_column_slice(order: str) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(38, 128)), rng.normal(size=(128, 3000))
    out = np.zeros((38, 4000), order=order)
    result = serial_matmul(a, b, out=out[:, 500:3500])
    np.testing.assert_allclose(out[:, 500:3500], a @ b, atol=1e-12)
    np.testing.assert_allclose(result, a @ b, atol=1e-12)
    assert not out[:, :500].any() and not out[:, 3500:].any()


def test_solve_psd_rank_deficient_is_the_pseudo_inverse() -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    x = np.column_stack([x, x[:, 0] + x[:, 1]])  # rank 3 of 4
    gram = (x.T @ x)[None]
    rhs = np.random.default_rng(1).normal(size=(1, 4, 2))
    np.testing.assert_allclose(
        solve_psd(gram, rhs, rank=3)[0], np.linalg.pinv(gram[0]) @ rhs[0], rtol=1e-8
    )


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
    solution, ok = cholesky_solve(gram, rhs)
    assert ok.tolist() == [v != 3 for v in range(30)]
    expected = np.linalg.solve(gram.transpose(2, 0, 1), rhs.transpose(2, 0, 1)).transpose(1, 2, 0)
    np.testing.assert_allclose(solution[:, :, ok], expected[:, :, ok], rtol=1e-9)
