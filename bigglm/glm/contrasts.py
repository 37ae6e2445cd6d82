"""Contrasts: one specification, t and F statistics, p and z, fixed effects.

The contrast specification, the same everywhere in bigglm (:meth:`bigglm.GLMResult.contrast`
and ``to_nifti``, :func:`bigglm.design.check_estimable` and ``contrast_scale``, the YAML
``contrasts`` section and ``bigglm fit --contrast NAME=EXPR``):

* **One contrast** is an expression (``"faces - houses"``), a weight vector with one
  weight per design column, a weights dict ``{column: weight}`` (``{"faces": 1,
  "houses": -1}`` is the single contrast faces - houses), or, for F, a list of
  expressions or a (q, P) matrix (one row each).
* **Several named contrasts** are a dict ``{name: one contrast}``. A dict whose values are
  all numbers (or None) is a weights dict; a dict mixing numbers with expressions or
  vectors is ambiguous and refused, as is ``{}``.
* ``kind`` is exactly ``"t"`` or ``"F"``; anything else (``"T"``, ``"f"``) is refused.
* Refused, with one :class:`~bigglm.exceptions.DesignError` naming the contrast: expressions
  that name no column (``"3"``, ``"1 - 1"``), empty contrasts, NaN, Inf or None weights,
  all-zero rows, unknown columns, a vector whose length is not the number of columns,
  several rows for t, linearly dependent rows for F.
* A name becomes a file label by :func:`label` (``faces_minus_houses`` and
  ``faces - houses`` both give ``facesMinusHouses``). Names are refused when empty, when
  they hold a path separator (``/``, ``\\``) or ``..``, or when two of them give the same
  label (also when the labels differ only in case). An unnamed contrast is named by its
  expression (a weights dict by the expression it stands for, ``"faces - houses"``).

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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bigglm.exceptions import DesignError
from bigglm.typing import ContrastKind

__all__ = [
    "ContrastSpec",
    "check_kind",
    "check_names",
    "contrast_matrix",
    "contrast_rows",
    "default_kind",
    "effect_and_covariance",
    "estimable_contrast",
    "expression_to_vector",
    "f_test",
    "file_labels",
    "fixed_effects",
    "is_named",
    "label",
    "map_file_name",
    "map_stat",
    "named_contrasts",
    "t_test",
]

Array = NDArray[np.float64]

#: One contrast: an expression, a list of expressions (F), a weight vector or matrix, or
#: a weights dict ``{column: weight}``.
ContrastSpec = str | Sequence[str] | ArrayLike | Mapping[str, float]

_KINDS: tuple[ContrastKind, ...] = ("t", "F")


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
        If the expression is empty, names an unknown column or no column at all
        (``"3"``), or is not linear.

    Examples
    --------
    >>> expression_to_vector("2*(a - b) + c/4", ["a", "b", "c", "constant"])
    array([ 2.  , -2.  ,  0.25,  0.  ])
    >>> expression_to_vector("1 - 1", ["a", "b"])
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: contrast '1 - 1' names no design column; ...
    """
    names = list(columns)
    if not expression.strip():
        raise DesignError(f"contrast {expression!r} is empty; give an expression like 'a - b'")
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
    vector = _Linear(names, quoted, expression).visit(tree.body)
    if np.ndim(vector) == 0:
        raise DesignError(
            f"contrast {expression!r} names no design column; write a combination of the "
            f"columns {names}, such as {' - '.join(names[:2])!r}"
        )
    return np.asarray(vector, dtype=np.float64)


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


def check_kind(kind: object) -> ContrastKind:
    """Return ``kind`` if it is ``"t"`` or ``"F"``; raise otherwise.

    Parameters
    ----------
    kind : object

    Returns
    -------
    {"t", "F"}

    Raises
    ------
    DesignError
        For anything else (``"T"``, ``"f"``, ``"tt"``): no kind is guessed.

    Examples
    --------
    >>> check_kind("F")
    'F'
    >>> check_kind("f")
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: contrast kind 'f' is not one of 't', 'F'; ...
    """
    if isinstance(kind, str) and kind in _KINDS:
        return kind
    raise DesignError(
        f"contrast kind {kind!r} is not one of 't', 'F'; use kind='t' for a t test of one "
        "row or kind='F' for an F test of one or more rows"
    )


def default_kind(spec: ContrastSpec) -> ContrastKind:
    """The kind a configuration implies: ``"F"`` for a list of rows, ``"t"`` otherwise.

    Used where no kind is given (the YAML ``contrasts`` section, ``bigglm fit``): a list
    of expressions or a 2-D matrix is an F contrast; an expression, a vector or a weights
    dict is a t contrast.

    Parameters
    ----------
    spec : one contrast (see the module docstring)

    Returns
    -------
    {"t", "F"}

    Examples
    --------
    >>> default_kind("a - b"), default_kind(["a", "b"]), default_kind({"a": 1, "b": -1})
    ('t', 'F', 't')
    """
    if isinstance(spec, str | Mapping):
        return "t"
    if _is_text_list(spec):
        return "F"
    return "F" if np.ndim(spec) == 2 else "t"


def contrast_matrix(
    spec: ContrastSpec,
    columns: Sequence[str],
    kind: ContrastKind = "t",
    *,
    name: str | None = None,
) -> Array:
    """A contrast as a (q, P) matrix: q = 1 for t, q >= 1 for F.

    Parameters
    ----------
    spec : str, list of str, array_like, or dict column -> weight
        An expression, a list of expressions (one row each), a weight vector with one
        weight per column, a weights dict, or a (q, P) matrix.
    columns : sequence of str
    kind : {"t", "F"}
    name : str, optional
        The contrast's name, for messages.

    Returns
    -------
    numpy.ndarray, shape (q, P)

    Raises
    ------
    DesignError
        For an invalid kind, or a contrast :func:`contrast_rows` refuses, with several rows
        for t, or with linearly dependent rows for F.

    Examples
    --------
    >>> contrast_matrix(["a", "b"], ["a", "b", "c"], kind="F")
    array([[1., 0., 0.],
           [0., 1., 0.]])
    >>> contrast_matrix({"a": 1, "b": -1}, ["a", "b", "c"])
    array([[ 1., -1.,  0.]])
    """
    check_kind(kind)
    rows = contrast_rows(spec, columns, name=name)
    if kind == "t" and rows.shape[0] != 1:
        raise _named(name, f"a t contrast has one row, got {rows.shape[0]}; use kind='F'")
    if np.linalg.matrix_rank(rows) < rows.shape[0]:
        raise _named(
            name,
            f"the {rows.shape[0]} rows of the F contrast are linearly dependent; "
            "drop the rows that are combinations of the others",
        )
    return rows


def contrast_rows(spec: ContrastSpec, columns: Sequence[str], *, name: str | None = None) -> Array:
    """Any contrast as a (q, P) matrix of finite weights, no row all zeros.

    The parser behind :func:`contrast_matrix` and :mod:`bigglm.design.diagnostics`; it
    does not check the row count or rank (see :func:`contrast_matrix`). A (P, 1) column
    vector is read as one row.

    Parameters
    ----------
    spec : one contrast (see the module docstring)
    columns : sequence of str
    name : str, optional
        The contrast's name, for messages.

    Returns
    -------
    numpy.ndarray, shape (q, P)

    Raises
    ------
    DesignError
        For an empty contrast, unknown columns, weights that are not finite numbers, a
        length that is not P, or a row of zeros; the message names the contrast.

    Examples
    --------
    >>> contrast_rows([[1], [0]], ["a", "b"])
    array([[1., 0.]])
    >>> contrast_rows([1, None], ["a", "b"], name="d")
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: contrast 'd': weights [1, None] are not all finite numbers ...
    """
    names = [str(c) for c in columns]
    try:
        rows = _parse_rows(spec, names)
    except DesignError as err:
        raise _named(name, str(err)) from None
    if rows.ndim == 2 and rows.shape == (len(names), 1):
        rows = rows.T  # a column vector, as textbooks write it
    if rows.ndim != 2 or rows.shape[1] != len(names):
        found = rows.shape[-1] if rows.ndim else 0
        raise _named(
            name,
            f"contrast has {found} weights but the design has {len(names)} columns "
            f"({names}): it does not fit; give one weight per column, or weights by "
            f"column as {{{names[0]!r}: 1, ...}}"
            if names
            else "the design has no columns",
        )
    if not np.all(np.isfinite(rows)):
        raise _named(
            name, f"weights {_short(spec)} are not all finite numbers (NaN, Inf or None found)"
        )
    if not np.all(np.any(rows, axis=1)):
        raise _named(name, "the contrast is all zeros (a row of zero weights tests nothing)")
    sizes = np.abs(rows[rows != 0])
    if sizes.min() < _WEIGHT_RANGE[0] or sizes.max() > _WEIGHT_RANGE[1]:
        raise _named(
            name,
            f"weights {_short(spec)} are outside 1e-10 to 1e10 in size: their effect and "
            "variance overflow or vanish in the float32 maps (a "
            "z of 0 or Inf everywhere); scale the weights (a t or F test does not depend "
            "on their scale)",
        )
    return rows


#: The sizes a non-zero weight may have: ``1e308 * faces`` gave z = 0 everywhere, and
#: ``1e-320 * faces`` z = Inf, from an effect and variance that no float holds.
_WEIGHT_RANGE: Final = (1e-10, 1e10)


def _parse_rows(spec: Any, names: list[str]) -> Array:
    """Rows of a contrast, before the shape and value checks."""
    if isinstance(spec, str):
        return expression_to_vector(spec, names)[None]
    if isinstance(spec, Mapping):
        return _weights_vector(spec, names)[None]
    if isinstance(spec, list | tuple) and any(isinstance(s, str) for s in spec):
        if not _is_text_list(spec):
            raise DesignError(
                f"contrast {list(spec)!r} mixes expressions and numbers; give a list of "
                "expressions (F rows) or a vector of weights"
            )
        return np.stack([expression_to_vector(s, names) for s in spec])
    try:
        rows = np.atleast_2d(np.asarray(spec, dtype=np.float64))
    except (TypeError, ValueError):
        raise DesignError(
            f"weights {_short(spec)} are not all numbers; give finite numbers, one per column"
        ) from None
    if rows.size == 0:
        raise DesignError(f"contrast {_short(spec)} is empty; give one weight per column")
    return rows


def _weights_vector(weights: Mapping[Any, Any], names: list[str]) -> Array:
    """A weights dict ``{column: weight}`` as a vector over ``names``."""
    if not weights:
        raise DesignError("the contrast {} is empty; give weights such as {'a': 1, 'b': -1}")
    unknown = [k for k in weights if k not in names]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=3)
        hint = f"did you mean {close}?" if close else f"columns are {names}"
        raise DesignError(f"weights name unknown column {unknown[0]!r}; {hint}")
    bad = [k for k, w in weights.items() if not _is_weight(w) or w is None]
    if bad:
        raise DesignError(
            f"the weight of {bad[0]!r} is {weights[bad[0]]!r}; weights are finite numbers"
        )
    return np.array([float(weights.get(n, 0.0)) for n in names])


def _is_weight(value: Any) -> bool:
    """True for a number (not a bool) or None: what a weights dict holds."""
    if value is None:
        return True
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _is_text_list(spec: Any) -> bool:
    """True for a non-empty list or tuple of strings."""
    return isinstance(spec, list | tuple) and bool(spec) and all(isinstance(s, str) for s in spec)


def _short(spec: Any) -> str:
    """A contrast for a message, cut to 60 characters."""
    text = repr(spec.tolist() if isinstance(spec, np.ndarray) else spec)
    return text if len(text) <= 60 else text[:57] + "..."


def _named(name: str | None, message: str) -> DesignError:
    """A DesignError whose message starts with the contrast's name (when it adds one)."""
    if name is None or message.startswith(f"contrast {name!r}"):
        return DesignError(message)
    return DesignError(f"contrast {name!r}: {message}")


def estimable_contrast(
    spec: ContrastSpec,
    design: Array,
    columns: Sequence[str],
    *,
    kind: ContrastKind | None = None,
    name: str | None = None,
) -> Array:
    """The (q, P) matrix of a contrast, checked to be estimable under ``design``.

    What every fit, plan and CLI check does with a user's contrast: :func:`contrast_matrix`
    (``kind`` defaults to :func:`default_kind`), then
    :func:`bigglm.design.check_estimable` (a contrast is estimable when it is orthogonal
    to the design's null space; the message names the linearly dependent columns).

    Parameters
    ----------
    spec : one contrast (see the module docstring)
    design : numpy.ndarray, shape (T, P)
    columns : sequence of str
    kind : {"t", "F"}, optional
    name : str, optional
        The contrast's name, for messages.

    Returns
    -------
    numpy.ndarray, shape (q, P)

    Raises
    ------
    DesignError

    Examples
    --------
    >>> x = np.column_stack([np.tile([1.0, 0.0], 4), np.tile([0.0, 1.0], 4), np.ones(8)])
    >>> estimable_contrast("a - b", x, ["a", "b", "c"])
    array([[ 1., -1.,  0.]])
    >>> estimable_contrast({"a": 1}, x, ["a", "b", "c"], name="a")
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: contrast 'a': contrast row 0 is not estimable: ...
    """
    from bigglm.design import diagnostics

    kind = default_kind(spec) if kind is None else kind
    weights = contrast_matrix(spec, columns, kind, name=name)
    diagnostics.check_estimable(design, weights, names=list(columns), name=name)
    return weights


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


def t_test(effect: Array, variance: Array, dof: float | Array) -> dict[str, Array]:
    """t, one-sided (upper-tail) p and z per voxel.

    Parameters
    ----------
    effect, variance : numpy.ndarray, shape (v,)
    dof : float or numpy.ndarray, shape (v,)
        One dof, or one per voxel (group models with per-voxel missing subjects).

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
        p[below] = special.stdtr(np.broadcast_to(dof, p.shape)[below], np.asarray(magnitude)[below])
    return {"stat": stat, "p": _clip_p(p), "z": np.sign(stat) * z_mag}


def f_test(effect: Array, covariance: Array, dof: float | Array) -> dict[str, Array]:
    """F, upper-tail p and z per voxel.

    Parameters
    ----------
    effect : numpy.ndarray, shape (q, v)
    covariance : numpy.ndarray, shape (q, q, v)
    dof : float or numpy.ndarray, shape (v,)
        One dof, or one per voxel.

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


def _log_betainc(a: float | Array, b: float | Array, x: Array) -> Array:
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
            a = np.broadcast_to(a, direct.shape)[tiny]  # per-voxel dof (group level)
            b = np.broadcast_to(b, direct.shape)[tiny]
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


def map_file_name(prefix: str, file_label: str, stat: str, *, extension: str = ".nii.gz") -> str:
    """The BIDS-derivatives name of a contrast's map (the one builder of that name).

    The names of BIDS Stats Models derivatives:
    ``<entities>_contrast-<label>_stat-<stat>_statmap.nii.gz``, where the statistic is
    named for what it is (``stat-t`` or ``stat-F``, never a generic ``stat-stat``).

    Parameters
    ----------
    prefix : str
        BIDS entities before ``contrast-`` (``"sub-01_task-faces"``), or ``""``.
    file_label : str
        The contrast's label (:func:`label`).
    stat : str
        The statistic: ``effect``, ``variance``, ``t``, ``F``, ``p``, ``z`` (or a
        permutation map's, :mod:`bigglm.inference.outputs`). The generic ``"stat"`` of a
        contrast's maps becomes ``t`` or ``F`` by :func:`map_stat` first.
    extension : str
        The file's extension: ``.nii.gz`` (volumes), ``.shape.gii`` (GIFTI, one file per
        hemisphere, the ``hemi`` entity in ``prefix``) or ``.dscalar.nii`` (CIFTI-2).

    Returns
    -------
    str

    Raises
    ------
    DesignError
        For ``stat="stat"``, which names no statistic.

    Examples
    --------
    >>> map_file_name("sub-01", "facesMinusHouses", "z")
    'sub-01_contrast-facesMinusHouses_stat-z_statmap.nii.gz'
    >>> map_file_name("", "any", map_stat("stat", "F"))
    'contrast-any_stat-F_statmap.nii.gz'
    >>> map_file_name("sub-01_hemi-L", "a", "z", extension=".shape.gii")
    'sub-01_hemi-L_contrast-a_stat-z_statmap.shape.gii'
    """
    if stat == "stat":
        raise DesignError(
            "map_file_name: 'stat' names no statistic; give 't' or 'F' (map_stat(name, kind))"
        )
    entities = f"{prefix}_" if prefix else ""
    return f"{entities}contrast-{file_label}_stat-{stat}_statmap{extension}"


def map_stat(name: str, kind: ContrastKind) -> str:
    """The statistic a map of a contrast of ``kind`` holds: ``"stat"`` is ``t`` or ``F``.

    ``stat`` is the generic name of the test statistic among a contrast's maps
    (:func:`bigglm.glm.result.contrast_maps`, the YAML ``outputs.maps``); every other name
    (``effect``, ``variance``, ``p``, ``z``) is the statistic already.

    Parameters
    ----------
    name : str
        A map's name.
    kind : {"t", "F"}
        The contrast's kind.

    Returns
    -------
    str

    Raises
    ------
    DesignError
        For ``t`` or ``F`` given with the other kind.

    Examples
    --------
    >>> map_stat("stat", "t"), map_stat("stat", "F"), map_stat("z", "F")
    ('t', 'F', 'z')
    """
    kind = check_kind(kind)
    if name == "stat":
        return kind
    if name in _KINDS and name != kind:
        raise DesignError(f"map {name!r}: the contrast's statistic is {kind!r}; ask for {kind!r}")
    return name


def label(name: str) -> str:
    """The BIDS camelCase file label of a contrast name or expression (the one builder).

    Letters and digits are kept, ``- + * /`` become ``Minus Plus Times Over``, ``.`` becomes
    ``p``, anything else separates words.

    Parameters
    ----------
    name : str

    Returns
    -------
    str
        Letters and digits only.

    Raises
    ------
    DesignError
        If the name has no letter or digit.

    Examples
    --------
    >>> label("faces - houses"), label("0.5*a + 0.5*b"), label("2*(a-b)")
    ('facesMinusHouses', '0p5TimesAPlus0p5TimesB', '2TimesAMinusB')
    >>> label("faces_minus_houses"), label("my contrast")
    ('facesMinusHouses', 'myContrast')
    """
    words = {"-": " Minus ", "+": " Plus ", "*": " Times ", "/": " Over ", ".": "p"}
    text = "".join(words.get(ch, ch if ch.isascii() and ch.isalnum() else " ") for ch in name)
    parts = text.split()
    if not parts or not any(ch.isalnum() for ch in name):
        raise DesignError(
            f"cannot make a file label from contrast name {name!r}; use letters, digits and '_'"
        )
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def check_names(names: Iterable[Any]) -> dict[str, str]:
    """Check contrast names given by the user; return ``{name: file label}``.

    Parameters
    ----------
    names : iterable of str

    Returns
    -------
    dict

    Raises
    ------
    DesignError
        For a name that is not text, is empty, holds a path separator (``/``, ``\\\\``) or
        ``..``, has no letter or digit, or gives the same file label as another name
        (compared ignoring case, as macOS and Windows file systems do).

    Examples
    --------
    >>> check_names(["faces_minus_houses", "any"])
    {'faces_minus_houses': 'facesMinusHouses', 'any': 'any'}
    >>> check_names(["faces_minus_houses", "facesMinusHouses"])
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: contrast names 'faces_minus_houses' and 'facesMinusHouses' ...
    """
    labels: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        _check_name(name)
        labels[name] = label(name)
        key = labels[name].casefold()
        if key in seen:
            raise DesignError(
                f"contrast names {seen[key]!r} and {name!r} give the same file label "
                f"{labels[name]!r} (their maps would overwrite each other); rename one"
            )
        seen[key] = name
    return labels


def _check_name(name: Any) -> None:
    """Refuse a name that is not text, is empty, or looks like a path."""
    if not isinstance(name, str) or not name.strip():
        raise DesignError(
            f"contrast name {name!r} is not a non-empty string; name contrasts like "
            "'faces_minus_houses'"
        )
    if "/" in name or "\\" in name or ".." in name:
        raise DesignError(
            f"contrast name {name!r} holds a path separator or '..'; names become file "
            "labels, use letters, digits and '_' (e.g. 'faces_minus_houses')"
        )


def is_named(contrasts: Any) -> bool:
    """Whether ``contrasts`` is a dict of named contrasts (not one contrast).

    A dict whose values are all numbers (or None) is one contrast (weights by column);
    a dict whose values are all expressions, vectors or weights dicts holds named
    contrasts; anything else is refused.

    Parameters
    ----------
    contrasts : one contrast or a dict name -> one contrast

    Returns
    -------
    bool

    Raises
    ------
    DesignError
        For ``{}`` or a dict mixing numbers with other values.

    Examples
    --------
    >>> is_named({"faces": 1, "houses": -1}), is_named({"d": "faces - houses"})
    (False, True)
    """
    if not isinstance(contrasts, Mapping):
        return False
    if not contrasts:
        raise DesignError(
            "the contrast {} is empty; give an expression ('faces - houses'), weights "
            "({'faces': 1, 'houses': -1}) or named contrasts ({'d': 'faces - houses'})"
        )
    weights = [k for k, v in contrasts.items() if _is_weight(v)]
    if not weights:
        return True
    if len(weights) < len(contrasts):
        other = next(k for k in contrasts if k not in weights)
        raise DesignError(
            f"the dict {_short(dict(contrasts))} mixes weights ({weights[0]!r}: "
            f"{contrasts[weights[0]]!r}) with contrasts ({other!r}: {_short(contrasts[other])}); "
            "write one contrast as weights by column, {'faces': 1, 'houses': -1}, or "
            "several named contrasts, {'d': 'faces - houses', 'f': {'faces': 1}}"
        )
    return False


def named_contrasts(
    contrasts: ContrastSpec | Mapping[str, ContrastSpec],
) -> dict[str, ContrastSpec]:
    """Normalise one contrast or a dict of named contrasts to ``{name: one contrast}``.

    The one normaliser of the package. Named contrasts are checked by
    :func:`check_names`; one contrast is named by its expression, a list of
    expressions by the expressions joined with ``" , "``, a weights dict by the
    expression it stands for, a vector or matrix ``"contrast"``.

    Parameters
    ----------
    contrasts : one contrast, or dict name -> one contrast

    Returns
    -------
    dict

    Raises
    ------
    DesignError
        As :func:`is_named` and :func:`check_names`.

    Examples
    --------
    >>> named_contrasts("a - b")
    {'a - b': 'a - b'}
    >>> named_contrasts({"faces": 1, "houses": -1})
    {'faces - houses': {'faces': 1, 'houses': -1}}
    """
    given: Any = contrasts
    if is_named(given):
        named: dict[str, ContrastSpec] = dict(given)
        check_names(named)
        return named
    if isinstance(given, str):
        return {given: given}
    if _is_text_list(given):
        return {" , ".join(given): given}
    if isinstance(given, Mapping):
        return {_weights_expression(given): given}
    return {"contrast": given}


def file_labels(contrasts: ContrastSpec | Mapping[str, ContrastSpec]) -> dict[str, str]:
    """``{name: file label}`` for what :func:`named_contrasts` returns.

    Given names are checked by :func:`check_names`; the name bigglm gives one unnamed
    contrast (its expression) is only turned into a label.

    Parameters
    ----------
    contrasts : one contrast, or dict name -> one contrast

    Returns
    -------
    dict

    Raises
    ------
    DesignError
        As :func:`named_contrasts`.

    Examples
    --------
    >>> file_labels("(a + b) / 2"), file_labels({"a_b": "a - b"})
    ({'(a + b) / 2': 'aPlusBOver2'}, {'a_b': 'aB'})
    """
    named = named_contrasts(contrasts)
    if is_named(contrasts):
        return check_names(named)
    return {name: label(name) for name in named}


def _weights_expression(weights: Mapping[Any, Any]) -> str:
    """The expression a weights dict stands for: ``{"a": 1, "b": -0.5}`` -> ``"a - 0.5*b"``.

    Examples
    --------
    >>> _weights_expression({"a": 1, "b": -0.5, "c": 0})
    'a - 0.5*b'
    >>> _weights_expression({"a": 0})  # refused when parsed; named for the message
    'contrast'
    """
    terms = []
    for column, weight in weights.items():
        if weight is None or not np.isfinite(weight) or weight == 0:
            continue  # None and NaN are refused when the contrast is parsed
        size = abs(float(weight))
        term = str(column) if size == 1 else f"{size:g}*{column}"
        terms.append(("- " if weight < 0 else "+ ") + term)
    if not terms:
        return "contrast"
    text = " ".join(terms)
    return text[2:] if text.startswith("+ ") else "-" + text[2:]
