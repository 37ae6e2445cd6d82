"""serial_matmul: the same product as ``a @ b`` whatever the shapes and output layout."""

from __future__ import annotations

import numpy as np
import pytest

from bigglm.glm.linalg import serial_matmul


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
