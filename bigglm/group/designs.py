"""Group-level design matrices from a participants table, by columns or by formula.

One row per map in the group store (a participant, or a participant's condition in a
repeated-measures table), one column per regressor. Two ways to say what the columns are:

* **A list of column names.** ``"intercept"`` is a column of ones; a categorical column
  (string, object, category or bool) gives one indicator column per level, named
  ``<column>_<level>`` (cell-means coding, as SPM's factors and nilearn's one column per
  group; levels sorted, a pandas Categorical in its categories' order); a numeric column
  is a covariate. Listing an identifier such as ``participant_id`` gives subject columns:
  SPM's paired and repeated-measures designs.
* **A Wilkinson formula**, through formulaic (``"1 + age + C(group)"``, ``"age * sex"``):
  the columns are formulaic's, with ``Intercept`` renamed ``intercept``. Names that are
  not identifiers, such as ``C(group)[T.patient]``, are written in backticks in a contrast
  (:func:`bigglm.glm.contrasts.expression_to_vector`): ``"`C(group)[T.patient]`"``.

Where the first level refuses or warns, the group level does the same: a missing value
in a used column is a :class:`~bigglm.exceptions.DesignError` naming the participant and
the column (no row is dropped silently), an all-zero column is refused, and a
rank-deficient design is returned as built with a
:class:`~bigglm.exceptions.BigGLMWarning` naming the dependent columns. Rank-deficient
designs are legal (an intercept with every group's column; subject columns with
condition columns): a contrast is checked for estimability when it is computed
(:func:`bigglm.design.check_estimable`).
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from formulaic import Formula, StructuredFormula, model_matrix
from formulaic.errors import FormulaicError
from formulaic.parser.types import Factor
from numpy.typing import NDArray

from bigglm.design.diagnostics import (
    condition_number,
    dependent_columns,
    matrix_rank,
    variance_inflation_factors,
)
from bigglm.design.events import read_table
from bigglm.exceptions import BigGLMWarning, DesignError

__all__ = ["INTERCEPT", "design", "reorder"]

logger = logging.getLogger(__name__)

#: The name of the column of ones, in a list of columns and in the result of a formula.
INTERCEPT = "intercept"

#: Names shown in a message before "and N more".
_SHOWN = 10

#: What a formula may use besides the table's columns and formulaic's transforms.
_CONTEXT: dict[str, Any] = {"np": np}


def design(
    participants: str | os.PathLike[str] | pd.DataFrame,
    columns_or_formula: str | Sequence[str],
    *,
    subjects: Sequence[str] | None = None,
    index: str = "participant_id",
    center: bool = True,
) -> pd.DataFrame:
    """A group-level design matrix from a participants table.

    Parameters
    ----------
    participants : str, os.PathLike or pandas.DataFrame
        A BIDS ``participants.tsv`` (tab-separated, ``n/a`` is missing; ``.csv`` by
        suffix) or a DataFrame, one row per map.
    columns_or_formula : str or sequence of str
        A list of column names (``"intercept"`` is the column of ones; categorical
        columns give one column ``<column>_<level>`` per level; numeric columns are
        covariates), or a Wilkinson formula evaluated by formulaic (``"1 + age +
        C(group)"``; ``np`` is numpy). A numeric column that codes groups (1, 2) is a
        covariate in a list: make it a ``category`` column, or write ``C(group)``.
    subjects : sequence of str, optional
        The group store's subject labels: the rows are put in this order. Every label
        must have exactly one row in the table and every row must have a label here.
    index : str, default="participant_id"
        The column that identifies the rows (``"map_id"`` for a long table with several
        maps per participant). A DataFrame without that column is identified by its
        index (not by a default ``0 .. n-1`` one).
    center : bool, default=True
        Subtract the mean from numeric covariates (in a formula: from the numeric
        variables it uses, before it is evaluated; a variable used inside a categorical
        term such as ``C(dose)`` is left as it is). The mean is over the rows of the
        design, the subjects of the analysis: where a subject's map is missing at some
        voxels, the covariate is not re-centred over the subjects present there.

    Returns
    -------
    pandas.DataFrame
        Float64, indexed by the labels (str). ``attrs`` records how it was made:
        ``"source"`` (the file, or "participants table"), ``"index"``, ``"formula"``
        (or None), ``"columns"`` (the list given, or None) and ``"centred"``
        (``{variable: mean}``).

    Raises
    ------
    DesignError
        If the file cannot be read; labels are missing or repeated; ``subjects`` and the
        table do not hold the same labels; a column is unknown (with close matches) or
        has a missing value (naming the participants); the formula cannot be parsed or
        evaluated; or the design has no columns, repeated names or an all-zero column.

    Warns
    -----
    BigGLMWarning
        If the design is rank deficient, naming the dependent columns.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03", "sub-04"],
    ...                       "age": [20.0, 30.0, 40.0, 50.0],
    ...                       "group": ["control", "patient", "control", "patient"]})
    >>> design(table, ["age", "group"])
                     age  group_control  group_patient
    participant_id
    sub-01         -15.0            1.0            0.0
    sub-02          -5.0            0.0            1.0
    sub-03           5.0            1.0            0.0
    sub-04          15.0            0.0            1.0
    >>> X = design(table, "1 + age + C(group)", subjects=["sub-04", "sub-03", "sub-02", "sub-01"])
    >>> list(X.columns), X.index[0], X.attrs["centred"]
    (['intercept', 'age', 'C(group)[T.patient]'], 'sub-04', {'age': 35.0})
    """
    source = participants if isinstance(participants, pd.DataFrame) else Path(participants)
    table, label = read_table(source, "participants")
    table.index = _labels(table, index, label)
    if subjects is not None:
        table = reorder(table, subjects, label)
    if isinstance(columns_or_formula, str):
        matrix, centred = _from_formula(table, columns_or_formula, label, center)
    else:
        matrix, centred = _from_columns(table, _column_list(columns_or_formula), label, center)
    _check_design(matrix, label, centred)
    _report_rank(matrix, label)
    matrix.attrs = {
        "source": label,
        "index": index,
        "formula": columns_or_formula if isinstance(columns_or_formula, str) else None,
        "columns": None if isinstance(columns_or_formula, str) else list(columns_or_formula),
        "centred": centred,
    }
    return matrix


# --- rows ---------------------------------------------------------------------------


def _listed(names: Sequence[object]) -> str:
    """``"sub-01, sub-02 and 3 more"``: names for a message, the first few of them."""
    shown = ", ".join(str(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _repeated(values: Sequence[str]) -> list[str]:
    """The values that occur more than once, in order of first occurrence."""
    counts = pd.Series(values).value_counts(sort=False)
    return [str(v) for v in counts.index[counts.to_numpy() > 1]]


def _labels(table: pd.DataFrame, index: str, label: str) -> pd.Index:
    """The rows' labels (str) from column ``index``, or from a DataFrame's own index."""
    if index in table.columns:
        raw = table[index]
    elif isinstance(table.index, pd.RangeIndex) and table.index.name is None:
        raise DesignError(
            f"{label} has no column {index!r}{_suggestion(index, table.columns)} (its "
            f"columns are {list(table.columns)}); name the column that identifies the "
            "maps with index=..., e.g. index='map_id' for a table with several maps "
            "per participant"
        )
    else:
        raw = table.index.to_series()
    missing = np.flatnonzero(raw.isna().to_numpy())
    if missing.size:
        raise DesignError(
            f"{label}: column {index!r} is empty in row(s) {_listed(missing.tolist())} "
            "(0-based, header excluded); give every row a label or drop the row"
        )
    name = index if raw.name is None else raw.name
    labels = pd.Index(raw.astype(str).to_numpy(dtype=object), name=name)
    repeated = _repeated(list(labels))
    if repeated:
        raise DesignError(
            f"{label}: {_listed(repeated)} appear(s) in more than one row of column "
            f"{index!r}; each row is one map, so keep one row per label (for several maps "
            "per participant, give each map its own label and pass index=...)"
        )
    return labels


def reorder(table: pd.DataFrame, subjects: Sequence[str], label: str) -> pd.DataFrame:
    """The table's rows in the order of ``subjects``, which must hold the same labels.

    The one check that a design's rows and a group store's maps are the same subjects
    (:func:`design` with ``subjects=``, :func:`bigglm.group.fit`).

    Parameters
    ----------
    table : pandas.DataFrame
        Indexed by label (str).
    subjects : sequence of str
    label : str
        What the table is, for messages (``"participants.tsv"``, ``"the design"``).

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    DesignError
        Naming the labels listed twice, the maps without a row and the rows without maps.

    Examples
    --------
    >>> table = pd.DataFrame({"age": [30, 40]}, index=["sub-01", "sub-02"])
    >>> reorder(table, ["sub-02", "sub-01"], "the design")["age"].tolist()
    [40, 30]
    >>> reorder(table, ["sub-01"], "the design")
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: the design and the subjects do not match; ... sub-02 ...
    """
    if isinstance(subjects, str):
        raise DesignError(
            f"subjects must be a sequence of labels, got the string {subjects!r}; "
            "pass a list such as ['sub-01', 'sub-02']"
        )
    wanted = [str(s) for s in subjects]
    repeated = _repeated(wanted)
    if repeated:
        raise DesignError(f"subjects lists {_listed(repeated)} more than once; list each once")
    repeated = _repeated([str(s) for s in table.index])
    if repeated:
        raise DesignError(f"{label} has several rows for {_listed(repeated)}; keep one each")
    present, listed = set(table.index), set(wanted)
    problems = []
    lacking = [s for s in wanted if s not in present]
    if lacking:
        problems.append(f"maps without a participants row: {_listed(lacking)} (add their rows)")
    extra = [s for s in table.index if s not in listed]
    if extra:
        problems.append(
            f"participants rows without maps: {_listed(extra)} (drop them from the table "
            "or collect their maps)"
        )
    if problems:
        raise DesignError(f"{label} and the subjects do not match; " + "; ".join(problems))
    return table.loc[wanted]


# --- columns of the table -------------------------------------------------------------


def _suggestion(name: str, choices: Iterable[object]) -> str:
    """``" (did you mean 'age'?)"`` when a close match exists, else ``""``."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=3)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _check_known(names: Sequence[str], table: pd.DataFrame, label: str, what: str) -> None:
    """Refuse names that are not columns of the table, suggesting close matches."""
    unknown = [n for n in names if n not in table.columns]
    if unknown:
        described = ", ".join(f"{n!r}{_suggestion(n, table.columns)}" for n in unknown)
        verb = "is not a column" if len(unknown) == 1 else "are not columns"
        raise DesignError(
            f"{what} uses {described}, which {verb} of {label}; its columns are "
            f"{list(table.columns)}; fix the name or add the column"
        )


def _check_complete(table: pd.DataFrame, names: Sequence[str], label: str) -> None:
    """Refuse missing (``n/a``) or infinite values in the columns the design uses."""
    found = []
    for name in names:
        column = table[name]
        bad = column.isna().to_numpy()
        if _is_numeric(column):
            bad = bad | ~np.isfinite(column.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            found.append(f"{_listed(list(table.index[bad]))} in column {name!r}")
    if found:
        raise DesignError(
            f"{label} has missing ('n/a') or infinite values: {'; '.join(found)}; fill them in or "
            "drop the participant(s) (no row is dropped silently)"
        )


def _is_numeric(column: pd.Series) -> bool:
    """A covariate's dtype: numeric and not bool."""
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _is_categorical(column: pd.Series) -> bool:
    """A factor's dtype: string, object, category or bool."""
    return (
        pd.api.types.is_bool_dtype(column)
        or pd.api.types.is_string_dtype(column)
        or pd.api.types.is_object_dtype(column)
        or isinstance(column.dtype, pd.CategoricalDtype)
    )


def _check_not_mistyped(column: pd.Series, name: str, label: str) -> None:
    """Refuse a text column whose values are mostly numbers: a covariate with a typo."""
    if isinstance(column.dtype, pd.CategoricalDtype) or _is_numeric(column):
        return
    numbers = pd.to_numeric(column.astype(object), errors="coerce").notna().to_numpy()
    if numbers.all() or numbers.mean() <= 0.5:
        return
    rows = column.index[~numbers]
    values = ", ".join(
        f"{v!r} ({r})" for r, v in zip(rows[:_SHOWN], column[~numbers], strict=False)
    )
    raise DesignError(
        f"{label}: column {name!r} holds mostly numbers but also {values}, so it would be "
        "read as labels, one column per value; fix these values (or, if the column is "
        "meant as labels, make it a pandas 'category' column)"
    )


# --- a list of columns ----------------------------------------------------------------


def _column_list(names: Sequence[str]) -> list[str]:
    """The list of column names, checked: non-empty, all strings, none repeated."""
    listed = list(names)
    if not listed:
        raise DesignError("no design columns given; list columns such as ['intercept', 'age']")
    odd = [n for n in listed if not isinstance(n, str)]
    if odd:
        raise DesignError(f"design columns are names (str), got {odd}; e.g. ['intercept', 'age']")
    repeated = _repeated(listed)
    if repeated:
        raise DesignError(f"design columns {repeated} are listed more than once; list each once")
    return listed


def _from_columns(
    table: pd.DataFrame, names: list[str], label: str, center: bool
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The design of a list of columns, and the means of the centred ones."""
    if INTERCEPT in names and INTERCEPT in table.columns:
        raise DesignError(
            f"{label} has a column {INTERCEPT!r}, but that name means the column of ones; "
            "rename the table's column"
        )
    used = [n for n in names if n != INTERCEPT]
    _check_known(used, table, label, "the design")
    _check_complete(table, used, label)
    blocks, centred = [], {}
    for name in names:
        if name == INTERCEPT:
            blocks.append(pd.DataFrame({INTERCEPT: 1.0}, index=table.index))
        elif _is_numeric(table[name]):
            values = table[name].to_numpy(dtype=np.float64)
            if center:
                values, centred[name] = _centre(values)
            blocks.append(pd.DataFrame({name: values}, index=table.index))
        else:
            blocks.append(_indicators(table[name], name, label))
    return pd.concat(blocks, axis=1), centred


def _centre(values: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
    """Values minus their mean, and the mean; exact zeros for a constant covariate."""
    mean = float(values.mean())
    if np.ptp(values) == 0:
        return np.zeros_like(values), mean
    return values - mean, mean


def _levels(column: pd.Series) -> list[Any]:
    """A factor's levels, sorted (a Categorical in its categories' order)."""
    levels = column.drop_duplicates()
    try:
        return levels.sort_values().tolist()
    except TypeError:  # mixed types in an object column
        return sorted(levels.tolist(), key=str)


def _indicators(column: pd.Series, name: str, label: str) -> pd.DataFrame:
    """One 0/1 column ``<name>_<level>`` per level of a categorical column."""
    if not _is_categorical(column):
        raise DesignError(
            f"{label}: column {name!r} has dtype {column.dtype}, which is neither numeric "
            "(a covariate) nor labels (one column per level); convert it to numbers or text"
        )
    _check_not_mistyped(column, name, label)
    return pd.DataFrame(
        {
            f"{name}_{level}": (column == level).to_numpy(dtype=np.float64)
            for level in _levels(column)
        },
        index=column.index,
    )


# --- a formula ------------------------------------------------------------------------


def _parse(formula: str) -> Formula:
    """The formula, parsed by formulaic; one-sided (a design has no response)."""
    try:
        parsed = Formula(formula)
    except FormulaicError as err:
        raise DesignError(f"cannot parse the design formula {formula!r}: {err}") from err
    if isinstance(parsed, StructuredFormula):
        raise DesignError(
            f"the design formula {formula!r} has a left-hand side; a group design is the "
            "right-hand side only (the maps are the response): write e.g. '1 + age'"
        )
    return parsed


def _formula_data(
    table: pd.DataFrame, formula: str, variables: list[str], label: str
) -> pd.DataFrame:
    """The table's columns a formula uses, checked; bool columns become factors."""
    _check_known([v for v in variables if v not in _CONTEXT], table, label, f"formula {formula!r}")
    data = table[[v for v in variables if v in table.columns]].copy()
    _check_complete(data, list(data.columns), label)
    for name in data.columns:
        _check_not_mistyped(data[name], name, label)
        if pd.api.types.is_bool_dtype(data[name]):
            data[name] = pd.Categorical(data[name])  # as patsy: levels False, True
    return data


def _evaluate(parsed: Formula, formula: str, data: pd.DataFrame, label: str) -> Any:
    """formulaic's model matrix; no row is dropped (missing values were refused)."""
    try:
        return model_matrix(parsed, data, na_action="raise", context=_CONTEXT)
    except (FormulaicError, ValueError) as err:
        raise DesignError(
            f"cannot evaluate the design formula {formula!r} on {label}: "
            f"{str(err).rstrip('.')}; check the "
            "formula (with center=True, transforms such as np.log see centred values)"
        ) from err


def _categorical_variables(
    parsed: Formula, formula: str, data: pd.DataFrame, label: str
) -> set[str]:
    """The variables that the formula uses in categorical terms (``C(dose)``, ``sex``)."""
    state = _evaluate(parsed, formula, data, label).model_spec.encoder_state
    return {
        variable
        for factor, (kind, _) in state.items()
        if kind is Factor.Kind.CATEGORICAL
        for variable in Formula(factor).required_variables
    }


def _from_formula(
    table: pd.DataFrame, formula: str, label: str, center: bool
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The design of a formula, and the means of the variables centred first."""
    parsed = _parse(formula)
    data = _formula_data(table, formula, sorted(parsed.required_variables), label)
    centred: dict[str, float] = {}
    if center:
        factors = _categorical_variables(parsed, formula, data, label)
        for name in data.columns:
            if _is_numeric(data[name]) and name not in factors:
                data[name], centred[name] = _centre(data[name].to_numpy(dtype=np.float64))
    matrix = _evaluate(parsed, formula, data, label)
    names = [INTERCEPT if c == "Intercept" else str(c) for c in matrix.columns]
    return pd.DataFrame(
        np.asarray(matrix, dtype=np.float64), index=table.index, columns=names
    ), centred


# --- the result ------------------------------------------------------------------------


def _check_design(matrix: pd.DataFrame, label: str, centred: dict[str, float]) -> None:
    """Refuse a design without columns, with repeated names or with all-zero columns."""
    if matrix.shape[1] == 0:
        raise DesignError(f"the design from {label} has no columns; add an intercept or a term")
    repeated = _repeated([str(c) for c in matrix.columns])
    if repeated:
        raise DesignError(
            f"design columns {repeated} appear twice (a column named like another's "
            "'<column>_<level>'); rename the table's column"
        )
    zero = [str(c) for c in matrix.columns if not matrix[c].to_numpy().any()]
    if zero:
        constant = [name for name in zero if name in centred]
        hint = (
            f"; {constant} have the same value for every subject (means {centred}), so "
            "centred they are all zeros"
            if constant
            else ""
        )
        raise DesignError(
            f"design columns {zero} are all zeros over the {matrix.shape[0]} rows{hint}; "
            "such a column carries nothing to estimate, drop it from the design"
        )


def _report_rank(matrix: pd.DataFrame, label: str) -> None:
    """Log the design's size and rank; a BigGLMWarning names dependent columns."""
    rank = matrix_rank(matrix)
    logger.info(
        "group design from %s: %d rows x %d columns, rank %d, condition number %.3g",
        label,
        *matrix.shape,
        rank,
        condition_number(matrix),
    )
    if rank == matrix.shape[1]:
        _report_collinearity(matrix, label)
        return
    groups = dependent_columns(matrix)
    described = "; ".join(" ~ ".join(repr(n) for n in g) for g in groups)
    warnings.warn(
        f"the group design is rank deficient ({described}); that is legal (SPM-style "
        "designs such as an intercept with every group's column, or subject columns with "
        "condition columns, are built so), but only contrasts that respect these "
        "dependencies are estimable, and each is checked when it is computed "
        "(bigglm.design.check_estimable tests one now)",
        BigGLMWarning,
        stacklevel=3,
    )


#: Variance inflation factor above which a column is reported as collinear with the others.
VIF_WARN = 10.0


def _report_collinearity(matrix: pd.DataFrame, label: str) -> None:
    """A BigGLMWarning naming the columns whose VIF exceeds :data:`VIF_WARN` (full rank)."""
    if matrix.shape[1] < 2:
        return
    vif = variance_inflation_factors(matrix).drop(INTERCEPT, errors="ignore")
    high = vif[vif > VIF_WARN]
    if high.empty:
        return
    listed = ", ".join(f"{name!r} ({value:.3g})" for name, value in high.items())
    warnings.warn(
        f"group design from {label}: columns {listed} have variance inflation factors above "
        f"{VIF_WARN:g}: they are nearly combinations of the other columns, so their "
        "estimates are unstable; consider dropping or combining them",
        BigGLMWarning,
        stacklevel=4,
    )
