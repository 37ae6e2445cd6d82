"""Contrasts: expressions over column names, t and F statistics, p and z, fixed effects.

* Expressions are linear combinations of design columns: ``"faces - houses"``,
  ``"0.5*a + 0.5*b"``, ``"2*(a - b)"``, ``"(a + b) / 2"``. Names that are not Python
  identifiers are written in backticks: ``"`trans-x` - constant"``.
* ``t = c b / sqrt(sigma2 c G c')`` and
  ``F = (C b)' [C G C']^-1 (C b) / (q sigma2)``, where G is ``(X'X)^+`` for OLS or the
  voxel's ``(X~'X~)^+`` for AR(p) noise.
* p values are upper-tail (as in nilearn); they come from log survival functions and
  z from the inverse normal of the log p, so z stays finite and monotone in the
  statistic far into the tail (t = 40 or t = 1e4 alike); p is clipped at the smallest
  normal float (about 2.2e-308) so it is never exactly 0, while z carries the full
  precision.
* Fixed effects across runs: the mean of the run effects with variance
  ``sum(var) / n^2`` (nilearn's default), or precision-weighted; dof add up.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bigglm.exceptions import DesignError
from bigglm.typing import ContrastKind

__all__ = [
    "ContrastSpec",
    "check_estimable",
    "contrast_matrix",
    "effect_and_covariance",
    "expression_to_vector",
    "f_test",
    "fixed_effects",
    "label",
    "named_contrasts",
    "t_test",
]

Array = NDArray[np.float64]

#: What :meth:`bigglm.GLMResult.contrast` accepts for one contrast.
ContrastSpec = str | Sequence[str] | ArrayLike


def expression_to_vector(expression: str, columns: Sequence[str]) -> Array:
    """The weight vector of a linear expression over design column names.

    Parameters
    ----------
    expression : str
        For example ``"faces - houses"`` or ``"2*(a - b)"``.
    columns : sequence of str
        The design's column names, in order.

    Returns
    -------
    numpy.ndarray, shape (len(columns),)

    Raises
    ------
    DesignError
        If the expression names an unknown column or is not linear.

    Examples
    --------
    >>> expression_to_vector("2*(a - b) + c/4", ["a", "b", "c", "constant"])
    array([ 2.  , -2.  ,  0.25,  0.  ])
    """
    names = list(columns)
    quoted: dict[str, str] = {}

    def unquote(match: str) -> str:
        key = f"__bigglm_column_{len(quoted)}__"
        quoted[key] = match
        return key

    parts = expression.split("`")
    if len(parts) % 2 == 0:
        raise DesignError(f"contrast {expression!r} has an unmatched backtick")
    source = "".join(p if i % 2 == 0 else unquote(p) for i, p in enumerate(parts))
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as err:
        raise DesignError(f"contrast {expression!r} is not a valid expression: {err.msg}") from err
    return _Linear(names, quoted, expression).visit(tree.body)


class _Linear(ast.NodeVisitor):
    """Evaluate an expression AST to a weight vector (numbers become scalars)."""

    def __init__(self, columns: list[str], quoted: dict[str, str], text: str) -> None:
        self.columns, self.quoted, self.text = columns, quoted, text

    def generic_visit(self, node: ast.AST) -> Any:
        raise DesignError(
            f"contrast {self.text!r}: {type(node).__name__} is not allowed; use column "
            "names, numbers, + - * / and parentheses"
        )

    def visit_Constant(self, node: ast.Constant) -> Any:
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            return self.generic_visit(node)
        return float(node.value)

    def visit_Name(self, node: ast.Name) -> Any:
        name = self.quoted.get(node.id, node.id)
        if name not in self.columns:
            close = difflib.get_close_matches(name, self.columns, n=3)
            hint = f"; did you mean {close}?" if close else f"; columns are {self.columns}"
            raise DesignError(f"contrast {self.text!r} names {name!r}, not a design column{hint}")
        vec = np.zeros(len(self.columns))
        vec[self.columns.index(name)] = 1.0
        return vec

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Any:
        value = self.visit(node.operand)
        if isinstance(node.op, ast.USub):
            return -value
        if isinstance(node.op, ast.UAdd):
            return value
        return self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        left, right = self.visit(node.left), self.visit(node.right)
        if isinstance(node.op, ast.Add | ast.Sub):
            if np.ndim(left) != np.ndim(right):
                raise DesignError(f"contrast {self.text!r} adds a number to a column")
            return left + right if isinstance(node.op, ast.Add) else left - right
        if isinstance(node.op, ast.Mult) and (np.ndim(left) == 0 or np.ndim(right) == 0):
            return left * right
        if isinstance(node.op, ast.Div) and np.ndim(right) == 0:
            return left / right
        raise DesignError(f"contrast {self.text!r} is not linear in the columns")


def contrast_matrix(spec: ContrastSpec, columns: Sequence[str], kind: ContrastKind = "t") -> Array:
    """A contrast as a (q, P) matrix: q = 1 for t, q >= 1 for F.

    Parameters
    ----------
    spec : str, list of str, or array_like
        An expression, a list of expressions (one row each), a weight vector, or a
        (q, P) matrix. Vectors shorter than P are padded with zeros (as nilearn does).
    columns : sequence of str
    kind : {"t", "F"}

    Returns
    -------
    numpy.ndarray, shape (q, P)

    Raises
    ------
    DesignError
        For a t contrast with several rows, a wrong length, or dependent F rows.

    Examples
    --------
    >>> contrast_matrix(["a", "b"], ["a", "b", "c"], kind="F")
    array([[1., 0., 0.],
           [0., 1., 0.]])
    """
    if isinstance(spec, str):
        rows = expression_to_vector(spec, columns)[None]
    elif _is_text_list(spec):
        rows = np.stack([expression_to_vector(str(s), columns) for s in spec])  # type: ignore[union-attr]
    else:
        rows = np.atleast_2d(np.asarray(spec, dtype=np.float64))
    n_cols = len(columns)
    if rows.ndim != 2 or rows.shape[1] > n_cols:
        raise DesignError(f"contrast of shape {rows.shape} does not fit {n_cols} design columns")
    rows = np.pad(rows, ((0, 0), (0, n_cols - rows.shape[1])))
    if kind == "t" and rows.shape[0] != 1:
        raise DesignError(f"a t contrast has one row, got {rows.shape[0]}; use kind='F'")
    if not np.any(rows):
        raise DesignError("the contrast is all zeros")
    if np.linalg.matrix_rank(rows) < rows.shape[0]:
        raise DesignError(f"the {rows.shape[0]} rows of the F contrast are linearly dependent")
    return rows


def _is_text_list(spec: Any) -> bool:
    """True for a non-empty list or tuple of strings."""
    return isinstance(spec, list | tuple) and bool(spec) and isinstance(spec[0], str)


def check_estimable(contrast: Array, design: Array, columns: Sequence[str], name: str) -> None:
    """Raise DesignError unless every row of the contrast is estimable under the design.

    The check itself is :func:`bigglm.design.diagnostics.check_estimable` (a contrast is
    estimable when it is orthogonal to the design's null space); this adds the
    contrast's name to its message, which names the linearly dependent columns.

    Parameters
    ----------
    contrast : numpy.ndarray, shape (q, P)
    design : numpy.ndarray, shape (T, P)
    columns : sequence of str
    name : str
        The contrast's name, for the message.

    Raises
    ------
    DesignError

    Examples
    --------
    >>> x = np.column_stack([np.tile([1.0, 0.0], 4), np.tile([0.0, 1.0], 4), np.ones(8)])
    >>> check_estimable(np.array([[1.0, -1.0, 0.0]]), x, ["a", "b", "c"], "a - b")
    >>> check_estimable(np.array([[1.0, 0.0, 0.0]]), x, ["a", "b", "c"], "a")
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: contrast 'a': contrast row 0 is not estimable: ...
    """
    from bigglm.design import diagnostics

    try:
        diagnostics.check_estimable(design, contrast, names=list(columns))
    except DesignError as err:
        raise DesignError(f"contrast {name!r}: {err}") from None


def effect_and_covariance(
    contrast: Array, beta: Array, sigma2: Array, unscaled: Array
) -> tuple[Array, Array]:
    """``C b`` and ``sigma2 C G C'`` per voxel.

    Parameters
    ----------
    contrast : numpy.ndarray, shape (q, P)
    beta : numpy.ndarray, shape (P, v)
    sigma2 : numpy.ndarray, shape (v,)
    unscaled : numpy.ndarray, shape (q, q) (shared, OLS) or (q, q, v) (per voxel, AR)
        ``C G C'`` with G = ``(X'X)^+`` or the voxel's ``(X~'X~)^+``.

    Returns
    -------
    effect : numpy.ndarray, shape (q, v)
    covariance : numpy.ndarray, shape (q, q, v)

    Examples
    --------
    >>> e, c = effect_and_covariance(np.eye(2)[:1], np.ones((2, 3)), np.ones(3), np.eye(1))
    >>> e.shape, c.shape
    ((1, 3), (1, 1, 3))
    """
    effect = contrast @ beta
    shared = unscaled[:, :, None] if unscaled.ndim == 2 else unscaled
    return effect, shared * sigma2


def t_test(effect: Array, variance: Array, dof: float) -> dict[str, Array]:
    """t, one-sided (upper-tail) p and z per voxel.

    Parameters
    ----------
    effect, variance : numpy.ndarray, shape (v,)
    dof : float

    Returns
    -------
    dict
        ``stat``, ``p`` and ``z``.

    Examples
    --------
    >>> out = t_test(np.array([40.0, -40.0, 1e4]), np.ones(3), 100.0)
    >>> bool(np.all(np.isfinite(out["z"]))), bool(out["z"][2] > out["z"][0] > 0)
    (True, True)
    >>> bool(out["p"][2] > 0)
    True
    """
    from scipy import special  # deferred (~0.25 s): 'bigglm validate' parses contrasts only

    with np.errstate(divide="ignore", invalid="ignore"):
        stat = effect / np.sqrt(variance)
        magnitude = np.abs(stat)
        log_upper = np.log(0.5) + _log_betainc(dof / 2, 0.5, dof / (dof + magnitude**2))
        z_mag = -special.ndtri_exp(log_upper)
        p = np.array(np.exp(log_upper), dtype=np.float64)
        # the lower tail only where it is needed (NaN stays NaN: NaN >= 0 is False)
        below = np.asarray(~(stat >= 0))
        p[below] = special.stdtr(dof, np.asarray(magnitude)[below])
    return {"stat": stat, "p": _clip_p(p), "z": np.sign(stat) * z_mag}


def f_test(effect: Array, covariance: Array, dof: float) -> dict[str, Array]:
    """F, upper-tail p and z per voxel.

    Parameters
    ----------
    effect : numpy.ndarray, shape (q, v)
    covariance : numpy.ndarray, shape (q, q, v)
    dof : float

    Returns
    -------
    dict
        ``stat``, ``p`` and ``z``.

    Examples
    --------
    >>> out = f_test(np.array([[3.0, 0.1]]), np.ones((1, 1, 2)), 50.0)
    >>> out["stat"]
    array([9.  , 0.01])
    >>> bool(out["z"][0] > 0 > out["z"][1])
    True
    """
    from scipy import special  # deferred (~0.25 s): 'bigglm validate' parses contrasts only

    q = effect.shape[0]
    finite = np.all(np.isfinite(covariance), axis=(0, 1)) & np.all(np.isfinite(effect), axis=0)
    cov = np.where(finite, covariance, 0.0).transpose(2, 0, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.linalg.pinv(cov, hermitian=True)
        stat = np.einsum("iv,vij,jv->v", effect, inv, effect) / q
        stat = np.where(finite, stat, np.nan)
        x = dof / (dof + q * stat)
        log_upper = _log_betainc(dof / 2, q / 2, x)
        lower = special.betainc(q / 2, dof / 2, 1.0 - x)
        z = np.where(log_upper < np.log(0.5), -special.ndtri_exp(log_upper), special.ndtri(lower))
    return {"stat": stat, "p": _clip_p(np.exp(log_upper)), "z": z}


def _log_betainc(a: float, b: float, x: Array) -> Array:
    """``log I_x(a, b)`` (regularised incomplete beta), accurate as it underflows.

    Uses ``I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 2F1(a + b, 1; a + 1; x)`` where the
    direct value is below 1e-250.
    """
    from scipy import special  # deferred (~0.25 s): 'bigglm validate' parses contrasts only

    direct = np.asarray(special.betainc(a, b, x), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(direct)
        tiny = direct <= 1e-250
        if np.any(tiny):
            xt = np.broadcast_to(x, direct.shape)[tiny]
            out[tiny] = (
                a * np.log(xt)
                + b * np.log1p(-xt)
                - np.log(a)
                - special.betaln(a, b)
                + np.log(special.hyp2f1(a + b, 1.0, a + 1.0, xt))
            )
    return out


def _clip_p(p: Array) -> Array:
    """p never exactly 0 (NaN stays NaN)."""
    return np.where(np.isnan(p), np.nan, np.maximum(p, np.finfo(np.float64).tiny))


def fixed_effects(
    effects: Sequence[Array],
    covariances: Sequence[Array],
    dofs: Sequence[float],
    *,
    precision_weighted: bool = False,
) -> tuple[Array, Array, float]:
    """Combine per-run contrast effects across runs (fixed effects).

    Parameters
    ----------
    effects : sequence of numpy.ndarray, shape (q, v)
    covariances : sequence of numpy.ndarray, shape (q, q, v)
    dofs : sequence of float
    precision_weighted : bool
        False: mean effect, covariance ``sum(cov) / n^2`` (nilearn's default).
        True: inverse-covariance weighted mean, covariance ``(sum cov^-1)^-1``.

    Returns
    -------
    effect : numpy.ndarray, shape (q, v)
    covariance : numpy.ndarray, shape (q, q, v)
    dof : float
        The sum of the runs' dof.

    Examples
    --------
    >>> e, c, d = fixed_effects([np.ones((1, 2)), 3 * np.ones((1, 2))],
    ...                         [np.ones((1, 1, 2))] * 2, [10.0, 10.0])
    >>> e, c[0, 0], d
    (array([[2., 2.]]), array([0.5, 0.5]), 20.0)
    """
    dof = float(np.sum(dofs))
    n = len(effects)
    if not precision_weighted:
        return sum(effects) / n, sum(covariances) / n**2, dof  # type: ignore[return-value]
    with np.errstate(invalid="ignore"):
        # pinv, not inv: a zero or NaN covariance (constant voxel) gives NaN, not an error
        precisions = [np.linalg.pinv(c.transpose(2, 0, 1), hermitian=True) for c in covariances]
        covariance = np.linalg.pinv(sum(precisions), hermitian=True)
    weighted = sum(np.einsum("vij,jv->vi", w, e) for w, e in zip(precisions, effects, strict=True))
    effect = np.einsum("vij,vj->iv", covariance, weighted)
    finite = np.all([np.isfinite(c).all(axis=(0, 1)) for c in covariances], axis=0)
    finite &= np.all([np.isfinite(e).all(axis=0) for e in effects], axis=0)
    effect[:, ~finite] = np.nan
    covariance[~finite] = np.nan
    return effect, covariance.transpose(1, 2, 0), dof


def label(name: str) -> str:
    """A BIDS-safe camelCase label for a contrast name or expression.

    Parameters
    ----------
    name : str

    Returns
    -------
    str

    Examples
    --------
    >>> label("faces - houses"), label("0.5*a + 0.5*b"), label("2*(a-b)")
    ('facesMinusHouses', '0p5TimesAPlus0p5TimesB', '2TimesAMinusB')
    """
    words = {"-": " Minus ", "+": " Plus ", "*": " Times ", "/": " Over ", ".": "p"}
    text = "".join(words.get(ch, ch if ch.isalnum() else " ") for ch in name)
    parts = text.split()
    if not parts:
        raise DesignError(f"cannot make a file label from contrast name {name!r}")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def named_contrasts(
    contrasts: ContrastSpec | Mapping[str, ContrastSpec],
) -> dict[str, ContrastSpec]:
    """Normalise one contrast or a mapping of them to ``{name: spec}``.

    Parameters
    ----------
    contrasts : str, list of str, array_like, or dict name -> one of those

    Returns
    -------
    dict

    Examples
    --------
    >>> named_contrasts("a - b")
    {'a - b': 'a - b'}
    """
    if isinstance(contrasts, Mapping):
        return dict(contrasts)
    if isinstance(contrasts, str):
        return {contrasts: contrasts}
    if _is_text_list(contrasts):
        return {" , ".join(contrasts): contrasts}  # type: ignore[arg-type]
    return {"contrast": contrasts}
