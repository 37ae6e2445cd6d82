"""bigglm.group.design against patsy, nilearn and scipy, and its refusals."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import patsy
import pytest
import scipy.stats
from nilearn.glm.second_level import make_second_level_design_matrix

from bigglm.design import check_estimable, matrix_rank
from bigglm.exceptions import BigGLMWarning, DesignError
from bigglm.glm.contrasts import expression_to_vector
from bigglm.group import design


@pytest.fixture
def table() -> pd.DataFrame:
    """Twelve participants: age, sex, a three-level group, a bool and a numeric dose code."""
    rng = np.random.default_rng(0)
    n = 12
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i:02d}" for i in range(1, n + 1)],
            "age": rng.uniform(18, 70, n).round(1),
            "sex": rng.permutation(["f", "m"] * (n // 2)),
            "group": rng.permutation(["control", "patient", "relative"] * (n // 3)),
            "handed": rng.permutation([True, False] * (n // 2)),
            "dose": rng.permutation([1, 2, 3] * (n // 3)),
        }
    )


def _long_table(n_participants: int = 5) -> pd.DataFrame:
    """A repeated-measures table: a 'pre' and a 'post' map per participant."""
    ids = [f"sub-{i:02d}" for i in range(1, n_participants + 1)]
    return pd.DataFrame(
        {
            "map_id": [f"{p}_{c}" for p in ids for c in ("pre", "post")],
            "participant_id": [p for p in ids for _ in range(2)],
            "condition": ["pre", "post"] * n_participants,
        }
    )


def _centred(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    out = table.copy()
    for c in columns:
        out[c] = out[c] - out[c].mean()
    return out


# --- formulas: patsy is the oracle ------------------------------------------------------


@pytest.mark.parametrize(
    "formula",
    [
        "1 + age + C(group)",
        "age * sex",
        "0 + C(group)",
        "age * C(group) + sex",
        "age + I(age ** 2)",
        "C(group):sex",
        "age + handed",
    ],
)
@pytest.mark.parametrize("center", [True, False])
def test_formula_equals_patsy(table: pd.DataFrame, formula: str, center: bool) -> None:
    with warnings.catch_warnings():
        # uncentred interactions are collinear with their main effects (VIF above 10):
        # the design is still what patsy builds, and the warning is tested on its own
        warnings.simplefilter("ignore", BigGLMWarning)
        X = design(table, formula, center=center)
    data = _centred(table, ["age"]) if center else table
    data = data.astype({"sex": object, "group": object})
    P = patsy.dmatrix(formula, data, return_type="dataframe").rename(
        columns={"Intercept": "intercept"}
    )
    assert sorted(X.columns) == sorted(P.columns)
    np.testing.assert_allclose(X[P.columns].to_numpy(), P.to_numpy(), rtol=0, atol=1e-12)
    assert list(X.index) == list(table["participant_id"])
    assert X.attrs["formula"] == formula and X.attrs["columns"] is None


def test_formula_variable_inside_c_is_not_centred(table: pd.DataFrame) -> None:
    X = design(table, "1 + age + C(dose)")
    assert X.attrs["centred"] == {"age": pytest.approx(table["age"].mean())}
    assert list(X.columns) == ["intercept", "age", "C(dose)[T.2]", "C(dose)[T.3]"]
    np.testing.assert_array_equal(X["C(dose)[T.3]"], (table["dose"] == 3).astype(float))


def test_formula_column_in_a_contrast(table: pd.DataFrame) -> None:
    X = design(table, "1 + C(group)")
    weights = expression_to_vector("`C(group)[T.patient]` - intercept", list(X.columns))
    np.testing.assert_array_equal(weights, [-1.0, 1.0, 0.0])


# --- lists of columns: nilearn is the oracle -------------------------------------------


def test_intercept_and_age_equal_nilearn(table: pd.DataFrame) -> None:
    confounds = table[["participant_id", "age"]].rename(columns={"participant_id": "subject_label"})
    order = list(confounds["subject_label"][::-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn 0.14 calls this full-rank design "singular"
        expected = make_second_level_design_matrix(order, confounds)
    X = design(confounds, ["intercept", "age"], index="subject_label", subjects=order, center=False)
    assert list(expected.columns) == ["age", "intercept"]  # nilearn: confounds, then intercept
    np.testing.assert_allclose(
        X[list(expected.columns)].to_numpy(), expected.to_numpy(), rtol=0, atol=1e-12
    )
    assert list(X.index) == order and X.index.name == "subject_label"


def test_one_column_per_group_level(table: pd.DataFrame) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full rank: no warning
        X = design(table, ["group", "age"])
    assert list(X.columns) == ["group_control", "group_patient", "group_relative", "age"]
    for level in ("control", "patient", "relative"):
        np.testing.assert_array_equal(X[f"group_{level}"], (table["group"] == level).to_numpy())
    bools = design(table, ["handed"])
    assert list(bools.columns) == ["handed_False", "handed_True"]


def test_categorical_levels_in_category_order(table: pd.DataFrame) -> None:
    table["group"] = pd.Categorical(table["group"], ["relative", "patient", "control"])
    assert list(design(table, ["group"]).columns) == [
        "group_relative",
        "group_patient",
        "group_control",
    ]


def test_intercept_with_every_group_warns_and_stays_estimable(table: pd.DataFrame) -> None:
    with pytest.warns(BigGLMWarning, match="rank deficient.*'intercept' ~ 'group_control'"):
        X = design(table, ["intercept", "group"])
    assert matrix_rank(X) == 3
    check_estimable(X, "group_patient - group_control")
    with pytest.raises(DesignError, match="not estimable"):
        check_estimable(X, "group_patient")


def test_paired_design_with_subject_columns() -> None:
    long = _long_table(5)
    with pytest.warns(BigGLMWarning, match="rank deficient"):
        X = design(long, ["participant_id", "condition"], index="map_id")
    subjects = [f"participant_id_sub-{i:02d}" for i in range(1, 6)]
    assert list(X.columns) == [*subjects, "condition_post", "condition_pre"]
    assert list(X.index) == list(long["map_id"]) and X.index.name == "map_id"
    assert matrix_rank(X) == 5 + 1
    check_estimable(X, "condition_post - condition_pre")
    with pytest.raises(DesignError, match="not estimable"):
        check_estimable(X, "condition_post")
    # the paired t test (scipy) from the pseudo-inverse fit of this design
    y = np.random.default_rng(1).normal(size=len(long))
    pinv = np.linalg.pinv(X.to_numpy())
    beta, residual = pinv @ y, y - X.to_numpy() @ (pinv @ y)
    c = expression_to_vector("condition_post - condition_pre", list(X.columns))
    sigma2 = residual @ residual / (len(y) - matrix_rank(X))
    t = c @ beta / np.sqrt(sigma2 * c @ pinv @ pinv.T @ c)
    expected = scipy.stats.ttest_rel(y[1::2], y[0::2]).statistic
    assert t == pytest.approx(expected, rel=1e-10)


# --- participants.tsv -------------------------------------------------------------------


def _write_tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("participant_id\tage\tgroup\n" + "\n".join(rows) + "\n")
    return path


def test_participants_tsv(tmp_path: Path) -> None:
    tsv = _write_tsv(
        tmp_path / "participants.tsv",
        ["sub-01\t20\tcontrol", "sub-02\t30\tpatient", "sub-03\t40\tn/a"],
    )
    X = design(tsv, ["intercept", "age"])
    assert list(X.index) == ["sub-01", "sub-02", "sub-03"]
    np.testing.assert_array_equal(X["age"], [-10.0, 0.0, 10.0])
    assert X.attrs["source"] == str(tsv) and X.attrs["columns"] == ["intercept", "age"]
    with pytest.raises(DesignError, match=r"sub-03 in column 'group'.*fill them in or drop"):
        design(tsv, ["group", "age"])
    with pytest.raises(DesignError, match=r"sub-03 in column 'group'"):
        design(tsv, "1 + C(group)")


def test_participants_tsv_missing_number(tmp_path: Path) -> None:
    tsv = _write_tsv(
        tmp_path / "participants.tsv",
        ["sub-01\tn/a\tcontrol", "sub-02\t30\tpatient", "sub-03\tn/a\tpatient"],
    )
    with pytest.raises(DesignError, match=r"participants.tsv.*sub-01, sub-03 in column 'age'"):
        design(tsv, "age")
    assert list(design(tsv, ["group"]).columns) == ["group_control", "group_patient"]


def test_participants_tsv_without_the_index_column(tmp_path: Path) -> None:
    path = tmp_path / "participants.tsv"
    path.write_text("subject\tage\nsub-01\t20\nsub-02\t30\n")
    with pytest.raises(DesignError, match=r"no column 'participant_id'.*index="):
        design(path, ["age"])
    assert list(design(path, ["age"], index="subject").index) == ["sub-01", "sub-02"]


def test_dataframe_index_identifies_rows(table: pd.DataFrame) -> None:
    indexed = table.set_index("participant_id")
    X = design(indexed, ["age"])
    assert list(X.index) == list(table["participant_id"])
    with pytest.raises(DesignError, match="no column 'participant_id'"):
        design(table.drop(columns="participant_id"), ["age"])


# --- subjects ----------------------------------------------------------------------------


def test_reorder_by_subjects(table: pd.DataFrame) -> None:
    order = list(np.random.default_rng(2).permutation(table["participant_id"]))
    X = design(table, ["age", "group"], subjects=order)
    assert list(X.index) == order
    expected = design(table, ["age", "group"]).loc[order]
    pd.testing.assert_frame_equal(X, expected)


def test_subjects_without_rows(table: pd.DataFrame) -> None:
    subjects = [*table["participant_id"], "sub-07x", "sub-09x"]
    with pytest.raises(DesignError, match="maps without a participants row: sub-07x, sub-09x"):
        design(table, ["age"], subjects=subjects)


def test_rows_without_maps(table: pd.DataFrame) -> None:
    subjects = list(table["participant_id"][2:])
    with pytest.raises(
        DesignError, match=r"participants rows without maps: sub-01, sub-02 \(drop them"
    ):
        design(table, ["age"], subjects=subjects)


def test_subjects_repeated_or_a_string(table: pd.DataFrame) -> None:
    with pytest.raises(DesignError, match="lists sub-01 more than once"):
        design(table, ["age"], subjects=[*table["participant_id"], "sub-01"])
    with pytest.raises(DesignError, match="got the string 'sub-01'"):
        design(table, ["age"], subjects="sub-01")


def test_repeated_labels(table: pd.DataFrame) -> None:
    table.loc[3, "participant_id"] = "sub-01"
    table.loc[5, "participant_id"] = "sub-02"
    with pytest.raises(DesignError, match=r"sub-01, sub-02 appear.*more than one row"):
        design(table, ["age"])


def test_missing_label(table: pd.DataFrame) -> None:
    table.loc[4, "participant_id"] = None
    with pytest.raises(DesignError, match=r"'participant_id' is empty in row\(s\) 4"):
        design(table, ["age"])


# --- refused designs ----------------------------------------------------------------------


def test_unknown_columns_suggest_close_matches(table: pd.DataFrame) -> None:
    with pytest.raises(DesignError, match=r"'agee' \(did you mean 'age'\?\), 'grp'.*'sex'"):
        design(table, ["intercept", "agee", "grp"])
    with pytest.raises(DesignError, match=r"formula '1 \+ C\(gruop\)' uses 'gruop' \(did you"):
        design(table, "1 + C(gruop)")


def test_constant_covariate_is_all_zeros(table: pd.DataFrame) -> None:
    table["site"] = 3.1
    with pytest.raises(DesignError, match=r"\['site'\] are all zeros"):
        design(table, ["intercept", "site"])
    with pytest.raises(DesignError, match=r"\['site'\] are all zeros"):
        design(table, "1 + site")


def test_refused_lists(table: pd.DataFrame) -> None:
    with pytest.raises(DesignError, match="no design columns"):
        design(table, [])
    with pytest.raises(DesignError, match=r"\['age'\] are listed more than once"):
        design(table, ["age", "age"])
    table["intercept"] = 1.0
    with pytest.raises(DesignError, match="means the column of ones"):
        design(table, ["intercept", "age"])


def test_refused_formulas(table: pd.DataFrame) -> None:
    with pytest.raises(DesignError, match="has a left-hand side"):
        design(table, "y ~ age")
    with pytest.raises(DesignError, match="cannot parse"):
        design(table, "age +")
    with pytest.raises(DesignError, match="no columns"):
        design(table, "0")


def test_mistyped_number(table: pd.DataFrame) -> None:
    table["age"] = table["age"].astype(str)
    table.loc[2, "age"] = "unknown"
    with pytest.raises(
        DesignError, match=r"'age' holds mostly numbers but also 'unknown' \(sub-03\)"
    ):
        design(table, ["age"])


# --- centring -------------------------------------------------------------------------------


def test_centring_records_means(table: pd.DataFrame) -> None:
    X = design(table, ["intercept", "age", "dose"])
    assert X.attrs["centred"] == {
        "age": pytest.approx(table["age"].mean()),
        "dose": pytest.approx(2.0),
    }
    np.testing.assert_allclose(X[["age", "dose"]].mean(), 0.0, atol=1e-12)
    raw = design(table, ["intercept", "age"], center=False)
    assert raw.attrs["centred"] == {}
    np.testing.assert_array_equal(raw["age"], table["age"])
    formula = design(table, "age * sex")
    assert formula.attrs["centred"] == {"age": pytest.approx(table["age"].mean())}
    assert formula["age"].mean() == pytest.approx(0.0, abs=1e-12)


def test_nearly_collinear_columns_are_named_by_their_variance_inflation_factor() -> None:
    from bigglm.design import variance_inflation_factors

    rng = np.random.default_rng(3)
    age = rng.uniform(20, 60, 30)
    table = pd.DataFrame(
        {
            "participant_id": [f"sub-{i:02d}" for i in range(30)],
            "age": age,
            "years_since_birth": age + rng.normal(0, 0.5, 30),  # nearly age
            "score": rng.normal(size=30),
        }
    )
    with pytest.warns(BigGLMWarning, match=r"'age' \(\d.*'years_since_birth'") as caught:
        x = design(table, ["intercept", "age", "years_since_birth", "score"])
    vif = variance_inflation_factors(x)
    assert vif["age"] > 10 and vif["score"] < 10
    assert "'score'" not in str(caught[0].message)
