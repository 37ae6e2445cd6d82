"""Orthogonalising regressors, as the correlated-regressors tutorial does it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from bigglm.exceptions import DesignError

__all__ = ["orthogonalize", "orthogonalize_in_order"]


def orthogonalize_in_order(columns: NDArray[np.float64]) -> NDArray[np.float64]:
    """Remove from each column its least-squares fit on the columns before it.

    Columns are not rescaled (unlike QR), so the first column is unchanged.

    Parameters
    ----------
    columns : numpy.ndarray
        Shape ``(n, p)``.

    Returns
    -------
    numpy.ndarray
        Same shape; column ``j`` is orthogonal to columns ``0 .. j-1``.

    Examples
    --------
    >>> orthogonalize_in_order(np.array([[1.0, 1.0], [1.0, 3.0]]))
    array([[ 1., -1.],
           [ 1.,  1.]])
    """
    out = np.array(columns, dtype=np.float64, copy=True)
    for j in range(1, out.shape[1]):
        coef = np.linalg.lstsq(out[:, :j], out[:, j], rcond=None)[0]
        out[:, j] -= out[:, :j] @ coef
    return out


def orthogonalize(X: pd.DataFrame, column: str, against: str | Sequence[str]) -> pd.DataFrame:
    """Replace ``column`` by its part that the ``against`` columns cannot explain.

    This is the tutorial's ``unique_hrf2 = hrf2 - hrf1 @ pinv(hrf1) @ hrf2``: the
    least-squares fit of ``column`` on ``against`` is subtracted. Fitting the new
    design leaves the beta of ``column`` unchanged, and gives the ``against`` columns
    the betas they would have without ``column`` in the model.

    Parameters
    ----------
    X : pandas.DataFrame
        The design.
    column : str
        The column to orthogonalise.
    against : str or sequence of str
        The columns it is made orthogonal to.

    Returns
    -------
    pandas.DataFrame
        A copy of ``X`` with ``column`` replaced.

    Raises
    ------
    DesignError
        If a named column is missing or ``column`` is among ``against``.

    Examples
    --------
    >>> import pandas as pd
    >>> X = pd.DataFrame({"a": [1.0, 0.0, 1.0], "b": [1.0, 1.0, 0.0]})
    >>> orthogonalize(X, "b", "a")
         a    b
    0  1.0  0.5
    1  0.0  1.0
    2  1.0 -0.5
    """
    others = [against] if isinstance(against, str) else list(against)
    missing = [c for c in [column, *others] if c not in X.columns]
    if missing:
        raise DesignError(
            f"cannot orthogonalize: design has no column {missing[0]!r} "
            f"(columns: {list(X.columns)})"
        )
    if column in others:
        raise DesignError(f"cannot orthogonalize {column!r} against itself")
    basis = X[others].to_numpy(dtype=np.float64)
    target = X[column].to_numpy(dtype=np.float64)
    out = X.copy()
    out[column] = target - basis @ (np.linalg.pinv(basis) @ target)
    return out
