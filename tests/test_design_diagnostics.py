"""Diagnostics against statsmodels and numpy, estimability, and the PNG figures.

VIFs are compared with statsmodels' ``variance_inflation_factor(standardize=False)``
(the textbook definition) to 1e-8 relative; correlations, rank and condition number
with numpy to 1e-12.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.outliers_influence import variance_inflation_factor

from bigglm.design import (
    check_estimable,
    condition_number,
    correlation_matrix,
    dependent_columns,
    frame_times,
    make_design,
    matrix_rank,
    variance_inflation_factors,
)
from bigglm.design.plot import plot_correlation, plot_design, plot_hrf
from bigglm.exceptions import DesignError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def design() -> pd.DataFrame:
    events = pd.DataFrame(
        {
            "onset": [0, 12, 30, 44, 60, 75, 90, 110],
            "duration": [4.0] * 8,
            "trial_type": ["a", "b", "a", "b", "a", "b", "a", "b"],
        }
    )
    return make_design(frame_times(70, 2.0), events, hrf="glover + derivative")


def test_vif_matches_statsmodels(design: pd.DataFrame) -> None:
    ours = variance_inflation_factors(design)
    values = design.to_numpy()
    for j, name in enumerate(design.columns):
        expected = variance_inflation_factor(values, j, standardize=False)
        assert ours[name] == pytest.approx(expected, rel=1e-8), name


def test_vif_is_infinite_for_a_dependent_column(design: pd.DataFrame) -> None:
    extended = design.assign(a_plus_b=design["a"] + design["b"])
    assert np.isinf(variance_inflation_factors(extended)["a_plus_b"])


def test_correlation_rank_condition_match_numpy(design: pd.DataFrame) -> None:
    varying = design.drop(columns="constant")
    np.testing.assert_allclose(
        correlation_matrix(varying), np.corrcoef(varying.to_numpy().T), atol=1e-12
    )
    assert np.isnan(correlation_matrix(design).loc["constant", "a"])
    assert matrix_rank(design) == design.shape[1]
    assert condition_number(design) == pytest.approx(np.linalg.cond(design.to_numpy()))
    singular = design.assign(copy=design["a"])
    assert matrix_rank(singular) == design.shape[1]
    assert condition_number(np.zeros((3, 2))) == np.inf


def test_dependent_columns_finds_groups_and_zero_columns() -> None:
    x = pd.DataFrame(
        {
            "a": [1.0, 0, 1, 0, 1],
            "b": [0.0, 1, 0, 1, 0],
            "empty": 0.0,
            "c": [1.0, 2, 3, 4, 6],
            "constant": 1.0,
        }
    )
    assert dependent_columns(x) == [["a", "b", "constant"], ["empty"]]
    assert dependent_columns(x[["a", "c", "constant"]]) == []


def test_estimable_contrasts_have_one_value_under_any_solution() -> None:
    """c'b is the same for every least-squares b exactly when check_estimable passes."""
    x = pd.DataFrame({"a": [1.0, 0, 1, 0, 1, 0], "b": [0.0, 1, 0, 1, 0, 1], "constant": 1.0})
    y = np.random.default_rng(2).normal(size=6)
    b = np.linalg.pinv(x.to_numpy()) @ y
    other = b + 3.0 * np.array([1.0, 1.0, -1.0])  # b + a null-space vector: same fit
    np.testing.assert_allclose(x.to_numpy() @ b, x.to_numpy() @ other)
    for contrast in ([1, -1, 0], [1, 0, 1], [0.5, 0.5, 1.0]):
        check_estimable(x, contrast)
        assert np.dot(contrast, b) == pytest.approx(np.dot(contrast, other))
    for contrast in ([1, 0, 0], [0, 0, 1], [1, 1, 0]):
        with pytest.raises(DesignError, match="'a', 'b', 'constant'") as info:
            check_estimable(x, contrast)
        assert "1*w[a] + 1*w[b] - 1*w[constant] = 0" in str(info.value)
        assert np.dot(contrast, b) != pytest.approx(np.dot(contrast, other))


def test_check_estimable_matrix_rows_and_names() -> None:
    x = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 2.0], [1.0, 1.0, 5.0]])
    check_estimable(x, [[1, 1, 0], [0, 0, 1]], names=["u", "v", "slope"])
    with pytest.raises(DesignError, match=r"contrast row 1 is not estimable: columns 'u', 'v'"):
        check_estimable(x, [[0, 0, 1], [1, -1, 0]], names=["u", "v", "slope"])
    with pytest.raises(DesignError, match="3 columns"):
        check_estimable(x, [1, 0], names=["u", "v", "slope"])
    with pytest.raises(DesignError, match="unknown column 'w'"):
        check_estimable(pd.DataFrame(x, columns=["u", "v", "slope"]), {"w": 1.0})


def test_full_rank_design_accepts_every_contrast(design: pd.DataFrame) -> None:
    rng = np.random.default_rng(0)
    check_estimable(design, rng.normal(size=(4, design.shape[1])))


@pytest.mark.parametrize("kind", ["design", "hrf", "correlation"])
def test_figures_are_png(tmp_path: Path, design: pd.DataFrame, kind: str) -> None:
    target = tmp_path / "figs" / f"{kind}.png"
    if kind == "design":
        written = plot_design(design, target)
    elif kind == "hrf":
        written = plot_hrf("spm + derivative + dispersion", 2.0, target)
    else:
        written = plot_correlation(design, target)
    assert written == target
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp left
