"""Contrast expressions, estimability, tail-safe p and z, and fixed effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import integrate, stats

import bigglm
from bigglm.exceptions import DesignError
from bigglm.glm import contrasts as con

pytestmark = pytest.mark.usefixtures("threads_scheduler")


COLUMNS = ["faces", "houses", "trans_x", "constant"]


@pytest.mark.parametrize(
    "expression,expected",
    [
        ("faces - houses", [1, -1, 0, 0]),
        ("0.5*faces + 0.5*houses", [0.5, 0.5, 0, 0]),
        ("2*(faces-houses)", [2, -2, 0, 0]),
        ("(faces + houses) / 2 - constant", [0.5, 0.5, 0, -1]),
        ("-trans_x", [0, 0, -1, 0]),
        ("`faces` - `houses`", [1, -1, 0, 0]),
    ],
)
def test_expressions_give_weight_vectors(expression: str, expected: list[float]) -> None:
    np.testing.assert_array_equal(con.expression_to_vector(expression, COLUMNS), expected)


def test_backticks_allow_names_that_are_not_identifiers() -> None:
    np.testing.assert_array_equal(
        con.expression_to_vector("`trans-x` - a", ["a", "trans-x"]), [-1, 1]
    )


@pytest.mark.parametrize(
    "expression,message",
    [
        ("faces - hoses", "did you mean \\['houses'\\]"),
        ("faces * houses", "not linear"),
        ("faces + 1", "adds a number"),
        ("faces -", "not a valid expression"),
        ("abs(faces)", "Call is not allowed"),
        ("`faces - houses", "unmatched backtick"),
    ],
)
def test_bad_expressions_raise_design_error(expression: str, message: str) -> None:
    with pytest.raises(DesignError, match=message):
        con.expression_to_vector(expression, COLUMNS)


def test_contrast_matrix_forms() -> None:
    np.testing.assert_array_equal(con.contrast_matrix([1, -1, 0, 0], COLUMNS), [[1, -1, 0, 0]])
    with pytest.raises(DesignError, match="2 weights but the design has 4 columns"):
        con.contrast_matrix([1, -1], COLUMNS)  # no silent zero padding: one weight per column
    f = con.contrast_matrix(["faces", "houses"], COLUMNS, kind="F")
    np.testing.assert_array_equal(f, np.eye(4)[:2])
    with pytest.raises(DesignError, match="one row"):
        con.contrast_matrix(np.eye(4)[:2], COLUMNS, kind="t")
    with pytest.raises(DesignError, match="linearly dependent"):
        con.contrast_matrix(["faces", "2*faces"], COLUMNS, kind="F")
    with pytest.raises(DesignError, match="does not fit"):
        con.contrast_matrix(np.ones(5), COLUMNS)


def conditions() -> pd.DataFrame:
    """Three conditions that cover every scan between them."""
    t = np.arange(30)
    return pd.DataFrame({f"c{i}": (t % 3 == i).astype(float) for i in range(3)})


def run() -> xr.Dataset:
    y = np.random.default_rng(0).normal(size=(30, 5)) + 10
    return xr.Dataset({"bold": (("time", "voxel"), y)})


def rank_deficient_fit() -> bigglm.GLMResult:
    """The three conditions plus the constant: rank 3 of 4 columns."""
    return bigglm.fit(run(), conditions().assign(constant=1.0))


def test_non_estimable_contrast_names_the_dependent_columns() -> None:
    result = rank_deficient_fit()
    message = r"contrast 'c0': .*not estimable: columns 'c0', 'c1', 'c2', 'constant' are linearly"
    with pytest.raises(DesignError, match=message):
        result.contrast({"c0": "c0"})
    differences = result.contrast("c0 - c1")  # estimable under the same design
    assert np.isfinite(differences["stat"].values).all()
    assert float(differences["dof"]) == 27  # T - rank


@pytest.mark.parametrize("noise", ["ols", "ar1", "ar2"])
def test_rank_deficient_difference_matches_full_rank_reparametrisation(noise: str) -> None:
    """c0 - c1 is the same quantity in the rank-3 design and in the design without constant."""
    a = bigglm.fit(run(), conditions().assign(constant=1.0), noise=noise).contrast("c0 - c1")
    b = bigglm.fit(run(), conditions(), noise=noise).contrast("c0 - c1")
    np.testing.assert_allclose(a["effect"].values, b["effect"].values, rtol=1e-10)
    np.testing.assert_allclose(a["stat"].values, b["stat"].values, rtol=1e-10)


def log_sf_by_quadrature(dist: stats.rv_continuous, x: float, *args: float) -> float:
    """log P(X > x) = logpdf(x) + log int_x^inf pdf(u) / pdf(x) du, independently of sf.

    With u = x / s the integral runs over s in (0, 1], where the heavy tail is smooth.
    """
    head = dist.logpdf(x, *args)

    def integrand(s: float) -> float:
        return float(np.exp(dist.logpdf(x / s, *args) - head) * x / s**2)

    ratio, _ = integrate.quad(integrand, 0.0, 1.0, epsabs=0, epsrel=1e-11, limit=200)
    return float(head + np.log(ratio))


@pytest.mark.parametrize("t,dof", [(40.0, 100.0), (300.0, 50.0), (1e4, 20.0), (5.0, 7.0)])
def test_t_tail_z_matches_an_independent_log_tail(t: float, dof: float) -> None:
    out = con.t_test(np.array([t]), np.array([1.0]), dof)
    log_p = log_sf_by_quadrature(stats.t, t, dof)
    z_ref = -stats.norm.ppf(np.exp(log_p)) if log_p > -700 else None
    assert np.isfinite(out["z"][0]) and out["p"][0] > 0
    if z_ref is not None:
        np.testing.assert_allclose(out["z"][0], z_ref, rtol=1e-8)
    # z from the log tail: Phi(-z) = p in logs
    np.testing.assert_allclose(stats.norm.logsf(out["z"][0]), log_p, rtol=1e-8)


def test_z_is_finite_symmetric_and_monotone_in_t() -> None:
    t = np.concatenate([-np.logspace(5, -3, 60), [0.0], np.logspace(-3, 5, 60)])
    out = con.t_test(t, np.ones_like(t), 30.0)
    assert np.all(np.isfinite(out["z"]))
    assert np.all(np.diff(out["z"]) > 0)
    np.testing.assert_allclose(out["z"], -out["z"][::-1], rtol=1e-12)
    assert np.all(out["p"] > 0) and np.all(out["p"] <= 1)  # 1 - 1e-129 rounds to 1


@pytest.mark.parametrize(
    "f,q,dof", [(3.0, 2, 40.0), (900.0, 3, 60.0), (1e6, 2, 30.0), (0.01, 4, 50.0)]
)
def test_f_tail_matches_an_independent_log_tail(f: float, q: int, dof: float) -> None:
    out = con.f_test(np.array([[np.sqrt(f * q)]] + [[0.0]] * (q - 1)), np.eye(q)[:, :, None], dof)
    np.testing.assert_allclose(out["stat"][0], f, rtol=1e-12)
    log_p = log_sf_by_quadrature(stats.f, f, q, dof)
    np.testing.assert_allclose(stats.norm.logsf(out["z"][0]), log_p, rtol=1e-7)
    assert out["p"][0] > 0


def test_fixed_effects_precision_weighted_is_inverse_variance_mean() -> None:
    effects = [np.array([[1.0, 2.0]]), np.array([[3.0, -1.0]])]
    variances = [np.array([[[1.0, 4.0]]]), np.array([[[3.0, 1.0]]])]
    effect, cov, dof = con.fixed_effects(effects, variances, [10.0, 12.0], precision_weighted=True)
    w = 1 / np.array([[1.0, 4.0], [3.0, 1.0]])
    np.testing.assert_allclose(effect[0], (w * [[1.0, 2.0], [3.0, -1.0]]).sum(0) / w.sum(0))
    np.testing.assert_allclose(cov[0, 0], 1 / w.sum(0))
    assert dof == 22.0


def test_precision_weighted_fixed_effects_keep_nan_voxels_nan() -> None:
    """A constant voxel (NaN variance) in any run gives NaN, not an error or a zero."""
    variances = [np.array([[[1.0, np.nan]]]), np.array([[[2.0, 1.0]]])]
    effect, cov, _ = con.fixed_effects(
        [np.ones((1, 2))] * 2, variances, [5.0, 5.0], precision_weighted=True
    )
    np.testing.assert_allclose(effect[0, 0], 1.0)
    assert np.isnan(effect[0, 1]) and np.isnan(cov[0, 0, 1])


@pytest.mark.parametrize(
    "name,expected",
    [
        ("faces - houses", "facesMinusHouses"),
        ("eff_of_interest", "effOfInterest"),
        ("a/b", "aOverB"),
    ],
)
def test_bids_labels(name: str, expected: str) -> None:
    assert con.label(name) == expected


def test_map_names_name_the_statistic_never_stat() -> None:
    """BIDS Stats Models derivatives: stat-t / stat-F, from the contrast's kind."""
    names = {
        kind: [con.map_file_name("sub-01", "a", con.map_stat(s, kind)) for s in ("stat", "z")]
        for kind in ("t", "F")
    }
    assert names == {
        "t": ["sub-01_contrast-a_stat-t_statmap.nii.gz", "sub-01_contrast-a_stat-z_statmap.nii.gz"],
        "F": ["sub-01_contrast-a_stat-F_statmap.nii.gz", "sub-01_contrast-a_stat-z_statmap.nii.gz"],
    }
    with pytest.raises(DesignError, match="'stat' names no statistic"):
        con.map_file_name("sub-01", "a", "stat")
    with pytest.raises(DesignError, match="the contrast's statistic is 'F'"):
        con.map_stat("t", "F")


# --- one contrast specification (issue items 4, 5, 6) -------------------------------------


def two_condition_fit() -> tuple[bigglm.GLMResult, pd.DataFrame, np.ndarray]:
    x = conditions()[["c0", "c1"]].assign(constant=1.0)
    y = run()["bold"].values
    return bigglm.fit(run(), x), x, y


def test_a_weights_dict_is_one_contrast_everywhere() -> None:
    """{"c0": 1, "c1": -1} is the single contrast c0 - c1 for the fit and the diagnostics."""
    result, x, y = two_condition_fit()
    weights = {"c0": 1, "c1": -1}
    c = np.array([1.0, -1.0, 0.0])
    beta = np.linalg.pinv(x.to_numpy()) @ y  # brute force
    maps = result.contrast(weights)
    assert "contrast" not in maps.dims and maps.attrs["name"] == "c0 - c1"
    np.testing.assert_allclose(maps["effect"].values, c @ beta, rtol=1e-10)
    np.testing.assert_array_equal(maps["stat"].values, result.contrast("c0 - c1")["stat"].values)
    scale = float(np.sqrt(c @ np.linalg.pinv(x.to_numpy().T @ x.to_numpy()) @ c))
    assert bigglm.design.contrast_scale(x, weights) == pytest.approx(scale, rel=1e-12)
    bigglm.design.check_estimable(x, weights)
    deficient = conditions().assign(constant=1.0)  # c0 + c1 + c2 = constant
    for contrast in ({"c0": 1}, [1, 0, 0, 0], "c0"):
        with pytest.raises(DesignError, match="not estimable"):
            bigglm.design.check_estimable(deficient, contrast)


def test_named_contrasts_are_a_dict_of_single_contrasts() -> None:
    result, _, _ = two_condition_fit()
    many = result.contrast({"d": {"c0": 1, "c1": -1}, "e": "c0 - c1", "v": [1, -1, 0]})
    assert list(many["contrast"].values) == ["d", "e", "v"]
    for name in ("d", "v"):
        np.testing.assert_array_equal(
            many["stat"].sel(contrast=name), many["stat"].sel(contrast="e")
        )


@pytest.mark.parametrize("kind", ["T", "tt", "f", "", None])
def test_kind_is_exactly_t_or_F(kind: object) -> None:
    result, _, _ = two_condition_fit()
    with pytest.raises(DesignError, match=r"contrast kind .* is not one of 't', 'F'"):
        result.contrast("c0 - c1", kind=kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("contrasts", "message"),
    [
        ("3", r"contrast '3' names no design column; .*'c0', 'c1'"),
        ("1 - 1", "contrast '1 - 1' names no design column"),
        ({"d": "2"}, "contrast '2' names no design column"),
        ("", "contrast '' is empty"),
        ("c0 - c0", "all zeros"),
        ([1.0, np.nan, 0.0], r"not all finite numbers \(NaN, Inf or None found\)"),
        ([1.0, np.inf, 0.0], "not all finite numbers"),
        ([1, None, 0], "not all finite numbers"),
        # finite, but no float holds their effect and variance (z was 0 or Inf everywhere)
        ("1e308 * c0", r"weights '1e308 \* c0' are outside 1e-10 to 1e10 in size"),
        ([1e-320, 0.0, 0.0], "are outside 1e-10 to 1e10 in size"),
        ({"c0": 1e12, "c1": -1}, "are outside 1e-10 to 1e10 in size"),
        ({"d": [1, None, 0]}, r"contrast 'd': weights \[1, None, 0\] are not all finite"),
        ({"c0": None, "c1": 1}, "the weight of 'c0' is None"),
        ({"c0": np.nan}, "not all finite numbers"),
        ({}, r"the contrast \{\} is empty"),
        ([], r"contrast \[\] is empty"),
        ({"c0": 1, "d": "c0 - c1"}, r"mixes weights \('c0': 1\) with contrasts \('d': 'c0 - c1'\)"),
        ({"c0": 1, "hoses": -1}, "unknown column 'hoses'"),
        ([1, -1], "2 weights but the design has 3 columns"),
        (["c0", 1], "mixes expressions and numbers"),
        ({"d": ["c0", "2*c0"]}, "contrast 'd': the 2 rows of the F contrast are linearly"),
        ({"../../x": "c0"}, "contrast name '../../x' holds a path separator or '..'"),
        ({"a/b": "c0"}, "holds a path separator"),
        ({" ": "c0"}, "contrast name ' ' is not a non-empty string"),
        ({1: "c0"}, "contrast name 1 is not a non-empty string"),
        ({"--": "c0"}, "cannot make a file label"),
        (
            {"c0_minus_c1": "c0 - c1", "c0MinusC1": "c0 - c1"},
            "names 'c0_minus_c1' and 'c0MinusC1' give the same file label 'c0MinusC1'",
        ),
        ({"Faces": "c0", "faces": "c1"}, "give the same file label"),
    ],
)
def test_each_bad_contrast_is_one_design_error(contrasts: object, message: str) -> None:
    result, _, _ = two_condition_fit()
    kind = "F" if "linearly" in message else "t"
    with pytest.raises(DesignError, match=message):
        result.contrast(contrasts, kind=kind)  # type: ignore[arg-type]


def test_names_with_spaces_are_labelled_deterministically() -> None:
    assert con.file_labels({"my contrast": "c0", "c0_minus_c1": "c0 - c1"}) == {
        "my contrast": "myContrast",
        "c0_minus_c1": "c0MinusC1",
    }
    assert con.file_labels("(c0 + c1) / 2") == {"(c0 + c1) / 2": "c0PlusC1Over2"}  # unnamed
