"""Design diagnostics: efficiency of contrasts, collinearity, rank and estimability.

:func:`check_estimable` is what the GLM engine calls before computing a contrast:
under a rank-deficient design only contrasts in the row space of X have a unique value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from bigglm.exceptions import DesignError
from bigglm.glm.contrasts import contrast_rows

__all__ = [
    "check_estimable",
    "condition_number",
    "contrast_scale",
    "correlation_matrix",
    "dependent_columns",
    "matrix_rank",
    "variance_inflation_factors",
]

DesignLike = pd.DataFrame | ArrayLike


def _as_matrix(X: DesignLike) -> tuple[NDArray[np.float64], list[str]]:
    """The design as a 2-D float array and its column names (``x0 ..`` for arrays)."""
    if isinstance(X, pd.DataFrame):
        return X.to_numpy(dtype=np.float64), [str(c) for c in X.columns]
    values = np.asarray(X, dtype=np.float64)
    if values.ndim != 2:
        raise DesignError(f"a design must be 2-D (time x regressor), got shape {values.shape}")
    return values, [f"x{j}" for j in range(values.shape[1])]


def contrast_scale(X: DesignLike, contrast: ArrayLike | Mapping[str, float]) -> float:
    """The design factor ``sqrt(c' (X'X)^+ c)`` of a t contrast.

    The standard error of ``c'b`` is ``sigma * contrast_scale(X, c)``: the larger it
    is, the less efficient the design is for that contrast.

    Parameters
    ----------
    X : pandas.DataFrame or array_like
        Design, shape ``(n, p)``.
    contrast : array_like, mapping or str
        ``p`` weights (a row or column vector), ``{column: weight}`` (one contrast:
        ``{"faces": 1, "houses": -1}`` is faces - houses), or an expression over the
        DataFrame's columns; as :meth:`bigglm.GLMResult.contrast` reads it.

    Returns
    -------
    float

    Raises
    ------
    DesignError
        If the contrast does not have one weight per column, has several rows, or is
        refused by :func:`bigglm.glm.contrasts.contrast_rows` (unknown columns, NaN weights).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> contrast_scale(np.ones((4, 1)), [1.0])
    0.5
    >>> x = pd.DataFrame({"a": [1.0, 0, 1, 0], "b": [0.0, 1, 0, 1]})
    >>> contrast_scale(x, {"a": 1, "b": -1}) == contrast_scale(x, "a - b") == 1.0
    True
    """
    matrix, names = _as_matrix(X)
    rows = contrast_rows(contrast, names)
    if rows.shape[0] != 1:
        raise DesignError(f"contrast_scale takes one contrast row, got {rows.shape[0]}")
    c = rows[0]
    return float(np.sqrt(c @ np.linalg.pinv(matrix.T @ matrix) @ c))


def correlation_matrix(X: pd.DataFrame) -> pd.DataFrame:
    """Pearson correlations between regressors (NaN for constant columns).

    Parameters
    ----------
    X : pandas.DataFrame
        Design.

    Returns
    -------
    pandas.DataFrame
        Shape ``(p, p)``, labelled by column.

    Examples
    --------
    >>> import pandas as pd
    >>> correlation_matrix(pd.DataFrame({"a": [1.0, 2, 3], "b": [3.0, 2, 1]}))
         a    b
    a  1.0 -1.0
    b -1.0  1.0
    """
    return X.astype(np.float64).corr()


def _has_constant(columns: NDArray[np.float64]) -> bool:
    """Whether a constant vector lies in the span of the columns."""
    if columns.shape[1] == 0:
        return False
    ones = np.ones(columns.shape[0])
    fit = columns @ np.linalg.lstsq(columns, ones, rcond=None)[0]
    return bool(np.allclose(fit, ones, atol=1e-8))


def variance_inflation_factors(X: pd.DataFrame) -> pd.Series:
    """Variance inflation factor ``1 / (1 - R_j^2)`` of each column.

    ``R_j^2`` is from regressing column ``j`` on all the others; it is centred when the
    others span a constant, uncentred otherwise (statsmodels'
    ``variance_inflation_factor(..., standardize=False)``). The value of the constant
    column itself is the uncentred one and is rarely of interest. Values above ~10
    flag strong collinearity;
    ``inf`` means the column is a combination of the others.

    Parameters
    ----------
    X : pandas.DataFrame
        Design.

    Returns
    -------
    pandas.Series
        One value per column.

    Examples
    --------
    >>> import pandas as pd
    >>> X = pd.DataFrame({"a": [1.0, 2, 3, 4], "b": [1.0, 3, 2, 4], "constant": 1.0})
    >>> variance_inflation_factors(X).round(3).tolist()
    [2.778, 2.778, 6.556]
    """
    matrix, names = _as_matrix(X)
    out = []
    for j in range(matrix.shape[1]):
        y = matrix[:, j]
        others = np.delete(matrix, j, axis=1)
        residual = y - others @ np.linalg.lstsq(others, y, rcond=None)[0]
        centre = y.mean() if _has_constant(others) else 0.0
        total = float(np.sum((y - centre) ** 2))
        ratio = float(residual @ residual) / total if total > 0 else 0.0
        out.append(np.inf if ratio <= 1e-15 else 1.0 / ratio)
    return pd.Series(out, index=names, name="vif")


def matrix_rank(X: DesignLike) -> int:
    """Numerical rank of the design (singular values above numpy's default tolerance).

    Parameters
    ----------
    X : pandas.DataFrame or array_like
        Design.

    Returns
    -------
    int

    Examples
    --------
    >>> matrix_rank([[1.0, 2.0], [2.0, 4.0]])
    1
    """
    return int(np.linalg.matrix_rank(_as_matrix(X)[0]))


def condition_number(X: DesignLike) -> float:
    """Ratio of the largest to the smallest singular value of the design (inf if singular).

    Parameters
    ----------
    X : pandas.DataFrame or array_like
        Design.

    Returns
    -------
    float

    Examples
    --------
    >>> condition_number([[2.0, 0.0], [0.0, 1.0]])
    2.0
    """
    s = np.linalg.svd(_as_matrix(X)[0], compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def _null_space(matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    """A sparse basis of the null space of X (p x k), one dependency per column.

    Columns of X are scaled to unit norm for the rank decision; the basis is brought to
    reduced row-echelon form so that separate dependencies (say, an all-zero column
    and three columns summing to the constant) stay in separate vectors.
    """
    norms = np.linalg.norm(matrix, axis=0)
    scale = np.where(norms > 0, norms, 1.0)
    # full V (p x p) is needed; U is only needed thin unless there are fewer rows than columns
    _, s, vt = np.linalg.svd(matrix / scale, full_matrices=matrix.shape[0] < matrix.shape[1])
    s_full = np.zeros(vt.shape[0])
    s_full[: s.size] = s
    largest = float(np.max(s)) if s.size else 0.0
    tol = max(matrix.shape) * np.finfo(np.float64).eps * max(largest, 1.0)
    null = vt[s_full <= tol] / scale[None, :]
    return _row_echelon(null).T


def _row_echelon(rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """Reduced row-echelon form (partial pivoting), rows normalised to unit length."""
    out = rows.copy()
    lead = 0
    for r in range(out.shape[0]):
        while lead < out.shape[1] and np.abs(out[r:, lead]).max(initial=0.0) < 1e-10:
            lead += 1
        if lead == out.shape[1]:
            break
        pivot = r + int(np.argmax(np.abs(out[r:, lead])))
        out[[r, pivot]] = out[[pivot, r]]
        out[r] /= out[r, lead]
        others = np.arange(out.shape[0]) != r
        out[others] -= np.outer(out[others, lead], out[r])
        lead += 1
    out[np.abs(out) < 1e-10] = 0.0
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-300)


def _involved(null: NDArray[np.float64], names: Sequence[str]) -> list[list[str]]:
    """Groups of columns sharing a null direction (overlapping groups merged)."""
    groups: list[set[int]] = []
    for k in range(null.shape[1]):
        members = set(np.flatnonzero(np.abs(null[:, k]) > 1e-8).tolist())
        for group in [g for g in groups if g & members]:
            members |= group
            groups.remove(group)
        groups.append(members)
    return [[names[j] for j in sorted(g)] for g in groups]


def dependent_columns(X: DesignLike) -> list[list[str]]:
    """Groups of columns that are linearly dependent (empty if X has full column rank).

    Columns are scaled to unit norm first, so the test does not depend on units. An
    all-zero column forms a group on its own.

    Parameters
    ----------
    X : pandas.DataFrame or array_like
        Design.

    Returns
    -------
    list of list of str

    Examples
    --------
    >>> import pandas as pd
    >>> X = pd.DataFrame({"a": [1.0, 0, 1], "b": [0.0, 1, 0], "c": [1.0, 2, 0],
    ...                   "constant": 1.0})
    >>> dependent_columns(X)
    [['a', 'b', 'constant']]
    """
    matrix, names = _as_matrix(X)
    return _involved(_null_space(matrix), names)


def check_estimable(
    X: DesignLike,
    C: ArrayLike | Mapping[str, float],
    names: Sequence[str] | None = None,
    *,
    name: str | None = None,
) -> None:
    """Raise if a contrast is not estimable under the design.

    ``C b`` has a unique value for every least-squares solution ``b`` exactly when each
    row of ``C`` is orthogonal to the null space of ``X``. The GLM engine calls this
    before computing a contrast.

    Parameters
    ----------
    X : pandas.DataFrame or array_like
        Design, ``(n, p)``.
    C : array_like, mapping or str
        A contrast vector ``(p,)``, a matrix ``(q, p)``, ``{column: weight}`` (one
        contrast, as everywhere in bigglm), or an expression.
    names : sequence of str, optional
        Column names for the message (default: the DataFrame's columns, or ``x0 ..``).
    name : str, optional
        The contrast's name, to start the message with.

    Raises
    ------
    DesignError
        Naming the contrast row and the dependent columns it does not treat as the
        design allows.

    Examples
    --------
    >>> import pandas as pd
    >>> X = pd.DataFrame({"a": [1.0, 0, 1, 0], "b": [0.0, 1, 0, 1], "constant": 1.0})
    >>> check_estimable(X, [1, -1, 0])  # a - b: estimable
    >>> check_estimable(X, [1, 0, 0])
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: contrast row 0 is not estimable: ...
    """
    matrix, default_names = _as_matrix(X)
    labels = list(default_names if names is None else names)
    if len(labels) != matrix.shape[1]:
        raise DesignError(f"got {len(labels)} names for a design of {matrix.shape[1]} columns")
    rows = contrast_rows(C, labels, name=name)
    null = _null_space(matrix)
    if null.size == 0:
        return
    for i, row in enumerate(rows):
        overlap = row @ null
        bad = np.abs(overlap) > 1e-8 * max(float(np.linalg.norm(row)), 1e-300)
        if bad.any():
            k = int(np.argmax(np.abs(overlap)))
            relation = _relation(null[:, k], labels)
            condition = _relation(null[:, k], labels, "w[{}]")
            involved = ", ".join(repr(n) for g in _involved(null[:, bad], labels) for n in g)
            raise DesignError(
                ("" if name is None else f"contrast {name!r}: ")
                + f"contrast row {i} is not estimable: columns {involved} are linearly "
                f"dependent in the design ({relation} = 0), so a contrast's weights w "
                f"must satisfy {condition} = 0 "
                f"and this one gives {row @ _unit_relation(null[:, k]):.3g}; drop one "
                "of these columns or change the contrast"
            )


def _unit_relation(direction: NDArray[np.float64]) -> NDArray[np.float64]:
    """A null direction scaled so its largest weight is 1 and its first weight > 0."""
    first = direction[np.flatnonzero(np.abs(direction) > 1e-8)[0]]
    return direction / (np.sign(first) * np.max(np.abs(direction)))


def _relation(direction: NDArray[np.float64], names: Sequence[str], term: str = "{}") -> str:
    """A null direction as text, largest weight 1: ``"1*a + 1*b - 1*constant"``."""
    scaled = _unit_relation(direction)
    terms = [(w, n) for w, n in zip(scaled, names, strict=True) if abs(w) > 1e-8]
    text = " ".join(f"{'-' if w < 0 else '+'} {abs(w):.3g}*{term.format(n)}" for w, n in terms)
    return text[2:] if text.startswith("+ ") else "-" + text[2:]
