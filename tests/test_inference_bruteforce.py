"""Permutation p values against brute force written plainly: loops over rearrangements
and voxels, refitting each rearranged data set by least squares.

Tolerances: statistics in float64 agree to 1e-8 relative (different summation orders);
p values are counts, equal exactly, ties within 1e-6 relative counting as ties on both
sides.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from bigglm.exceptions import DesignError
from bigglm.inference.permutation import permutation_test
from bigglm.inference.resampling import rearrangements

TIE = 1e-6


def _dataset(y: np.ndarray, chunks: tuple[int, int] | None = None) -> xr.Dataset:
    subjects = [f"sub-{i:02d}" for i in range(y.shape[0])]
    data = y if chunks is None else __import__("dask.array").array.from_array(y, chunks=chunks)
    return xr.Dataset({"effect": (("subject", "voxel"), data)}, coords={"subject": subjects})


def _one_sample_t(values: np.ndarray) -> float:
    n = values.size
    return float(values.mean() / (values.std(ddof=1) / np.sqrt(n)))


def _count_at_least(null: np.ndarray, observed: float) -> int:
    return int(sum(1 for value in null if value >= observed - TIE * abs(observed)))


def _brute_one_sample(y: np.ndarray, two_sided: bool) -> tuple[np.ndarray, ...]:
    """Every sign pattern, every voxel, with the subjects present there."""
    n, v = y.shape
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    stats = np.empty((flips.shape[0], v))
    for b, signs in enumerate(flips):
        for voxel in range(v):
            present = np.isfinite(y[:, voxel])
            stats[b, voxel] = _one_sample_t(signs[present] * y[present, voxel])
    if two_sided:
        stats = np.abs(stats)
    observed = stats[0]  # the all-plus pattern comes first
    maxima = stats.max(axis=1)
    p = np.array([_count_at_least(stats[:, k], observed[k]) for k in range(v)]) / len(flips)
    p_fwe = np.array([_count_at_least(maxima, observed[k]) for k in range(v)]) / len(flips)
    return observed, p, p_fwe, np.sort(maxima)


@pytest.mark.parametrize("two_sided", [False, True])
def test_exact_sign_flips_equal_enumeration(two_sided: bool) -> None:
    rng = np.random.default_rng(5)
    y = rng.normal(0.3, 1.0, (11, 14))
    y[:, :3] += 1.0
    y[0, 5] = np.nan  # missing subjects: one-sample voxels keep the others
    y[[2, 7], 9] = np.nan
    design = pd.DataFrame({"mean": 1.0}, index=[f"sub-{i:02d}" for i in range(11)])
    out = permutation_test(
        _dataset(y), design, n_perm=5000, two_sided=two_sided, precision="double", seed=0
    )
    assert out.attrs["exact"] and out.sizes["rearrangement"] == 2**11
    t, p, p_fwe, maxima = _brute_one_sample(y, two_sided)
    np.testing.assert_allclose(np.abs(out["t"]) if two_sided else out["t"], t, rtol=1e-8)
    np.testing.assert_array_equal(out["p"].values, p)
    np.testing.assert_array_equal(out["p_fwe"].values, p_fwe)
    np.testing.assert_allclose(np.sort(out["max_t"].values), maxima, rtol=1e-8)


def test_single_precision_p_values_equal_double() -> None:
    rng = np.random.default_rng(6)
    y = rng.normal(0.2, 1.0, (12, 40))
    design = pd.DataFrame({"mean": 1.0}, index=[f"sub-{i:02d}" for i in range(12)])
    single = permutation_test(_dataset(y), design, n_perm=5000, seed=0, precision="single")
    double = permutation_test(_dataset(y), design, n_perm=5000, seed=0, precision="double")
    np.testing.assert_allclose(single["t"], double["t"], rtol=1e-5)
    np.testing.assert_allclose(single["p"], double["p"], atol=2 / 4096)


def test_negative_contrast_flips_the_tail() -> None:
    rng = np.random.default_rng(7)
    y = rng.normal(-0.8, 1.0, (10, 6))
    design = pd.DataFrame({"mean": 2.0}, index=[f"sub-{i:02d}" for i in range(10)])
    out = permutation_test(_dataset(y), design, contrast="-mean", precision="double", seed=0)
    np.testing.assert_allclose(out["t"], [-_one_sample_t(y[:, k]) for k in range(6)], rtol=1e-10)


def _design(n: int, rng: np.random.Generator) -> pd.DataFrame:
    group = np.repeat([1.0, 0.0], n // 2)
    return pd.DataFrame(
        {
            "patients": group,
            "controls": 1.0 - group,
            "age": rng.normal(0.0, 10.0, n),
        },
        index=[f"sub-{i:02d}" for i in range(n)],
    )


def _brute_freedman_lane(
    y: np.ndarray,
    x: np.ndarray,
    c: np.ndarray,
    order: np.ndarray | None,
    signs: np.ndarray | None,
) -> np.ndarray:
    """Rearranged reduced-model residuals plus its fit, refitted with the full model."""
    null_basis = np.linalg.svd(c[None, :])[2][1:].T  # columns b with c'b = 0
    z = x @ null_basis
    hat_z = z @ np.linalg.pinv(z)
    residuals = y - hat_z @ y
    rows = (order if order is not None else signs).shape[0]
    pinv = np.linalg.pinv(x)
    unscaled = c @ np.linalg.pinv(x.T @ x) @ c
    dof = x.shape[0] - np.linalg.matrix_rank(x)
    stats = np.empty((rows, y.shape[1]))
    for b in range(rows):
        moved = residuals if order is None else residuals[order[b]]
        if signs is not None:
            moved = signs[b][:, None] * moved
        y_star = moved + hat_z @ y
        for voxel in range(y.shape[1]):
            beta = pinv @ y_star[:, voxel]
            rss = np.sum((y_star[:, voxel] - x @ beta) ** 2)
            stats[b, voxel] = (c @ beta) / np.sqrt(rss / dof * unscaled)
    return stats


@pytest.mark.parametrize("scheme", ["permute", "signflip", "both"])
def test_freedman_lane_equals_a_plain_loop_over_the_same_rearrangements(scheme: str) -> None:
    rng = np.random.default_rng(8)
    n, v = 14, 12
    design = _design(n, rng)
    y = rng.normal(0.0, 1.0, (n, v)) + 0.05 * design["age"].to_numpy()[:, None]
    y[: n // 2, :2] += 1.5
    out = permutation_test(
        _dataset(y),
        design,
        "patients - controls",
        n_perm=300,
        scheme=scheme,  # type: ignore[arg-type]
        seed=4,
        precision="double",
    )
    plan = rearrangements(n, scheme=scheme, n_perm=300, seed=4)  # type: ignore[arg-type]
    c = np.array([1.0, -1.0, 0.0])
    stats = _brute_freedman_lane(y, design.to_numpy(), c, *plan.rows(0, plan.count))
    observed, maxima = stats[0], stats.max(axis=1)
    np.testing.assert_allclose(out["t"], observed, rtol=1e-8)
    np.testing.assert_allclose(out["max_t"], maxima, rtol=1e-8)
    p = [_count_at_least(stats[:, k], observed[k]) / plan.count for k in range(v)]
    p_fwe = [_count_at_least(maxima, observed[k]) / plan.count for k in range(v)]
    np.testing.assert_array_equal(out["p"], p)
    np.testing.assert_array_equal(out["p_fwe"], p_fwe)
    assert out.attrs["scheme"] == scheme and not out.attrs["exact"]


def test_observed_t_equals_the_group_fit() -> None:
    from bigglm.group import fit

    rng = np.random.default_rng(9)
    design = _design(16, rng)
    y = rng.normal(0.0, 1.0, (16, 30))
    out = permutation_test(_dataset(y), design, "age", n_perm=50, seed=0, precision="double")
    fitted = fit(_dataset(y), design).contrast("age")
    np.testing.assert_allclose(out["t"], fitted["stat"], rtol=1e-10)


def test_incomplete_voxels_of_general_designs_are_not_tested() -> None:
    rng = np.random.default_rng(10)
    design = _design(12, rng)
    y = rng.normal(0.0, 1.0, (12, 5))
    y[3, 1] = np.nan
    out = permutation_test(_dataset(y), design, "patients - controls", n_perm=20, seed=0)
    assert np.isnan(out["t"][1]) and np.isnan(out["p"][1]) and np.isnan(out["p_fwe"][1])
    assert np.isfinite(out["t"][[0, 2, 3, 4]]).all()
    assert out.attrs["n_not_tested"] == 1


def test_chunking_does_not_change_the_result() -> None:
    rng = np.random.default_rng(12)
    design = _design(20, rng)
    y = rng.normal(0.0, 1.0, (20, 300)).astype(np.float32)
    runs = [
        permutation_test(_dataset(y, chunks), design, "age", n_perm=500, seed=3)
        for chunks in ((20, 300), (7, 64), (20, 25))
    ]
    for other in runs[1:]:
        for name in ("p", "p_fwe"):
            np.testing.assert_array_equal(runs[0][name], other[name])
        np.testing.assert_allclose(runs[0]["max_t"], other["max_t"], rtol=1e-12)


def test_exchangeability_blocks_are_respected() -> None:
    rng = np.random.default_rng(13)
    n = 12
    design = _design(n, rng).assign(site=np.tile([0.0, 1.0, 2.0], 4))
    y = rng.normal(0.0, 1.0, (n, 8))
    out = permutation_test(
        _dataset(y), design, "age", blocks="site", n_perm=200, seed=1, precision="double"
    )
    plan = rearrangements(n, scheme="permute", n_perm=200, seed=1, blocks=design["site"].to_numpy())
    stats = _brute_freedman_lane(
        y, design.to_numpy(), np.array([0.0, 0.0, 1.0, 0.0]), *plan.rows(0, plan.count)
    )
    np.testing.assert_allclose(out["max_t"], stats.max(axis=1), rtol=1e-8)


def test_bad_requests_get_one_message() -> None:
    rng = np.random.default_rng(14)
    design = _design(10, rng)
    ds = _dataset(rng.normal(size=(10, 4)))
    with pytest.raises(DesignError, match="one t contrast"):
        permutation_test(ds, design, [[1, -1, 0], [0, 0, 1]])
    with pytest.raises(DesignError, match="say which contrast"):
        permutation_test(ds, design)
    with pytest.raises(DesignError, match="signflip"):
        permutation_test(ds, pd.DataFrame({"m": 1.0}, index=design.index), scheme="permute")
    with pytest.raises(DesignError, match="not a design column"):
        permutation_test(ds, design, "age", blocks="family")
    with pytest.raises(DesignError, match="precision"):
        permutation_test(ds, design, "age", precision="half")  # type: ignore[arg-type]


def _null_tau2_plain(y: np.ndarray, s: np.ndarray) -> float:
    """ML tau2 >= 0 of y_i ~ N(0, tau2 + s_i), by a bounded scalar search (scipy)."""
    from scipy.optimize import minimize_scalar

    def nll(tau2: float) -> float:
        v = tau2 + s
        return float(np.sum(np.log(v) + y**2 / v))

    best = minimize_scalar(nll, bounds=(0.0, 100.0), method="bounded", options={"xatol": 1e-12})
    return float(best.x) if nll(best.x) < nll(0.0) else 0.0


def test_mixed_score_sign_flips_equal_enumeration() -> None:
    rng = np.random.default_rng(15)
    n, v = 10, 6
    s = rng.uniform(0.2, 3.0, (n, v))
    y = rng.normal(0.0, np.sqrt(0.5 + s))
    y[:, 0] += 1.5
    y[4, 3] = np.nan
    subjects = [f"sub-{i:02d}" for i in range(n)]
    ds = xr.Dataset(
        {"effect": (("subject", "voxel"), y), "variance": (("subject", "voxel"), s)},
        coords={"subject": subjects},
    )
    design = pd.DataFrame({"mean": 1.0}, index=subjects)
    out = permutation_test(ds, design, model="mixed", n_perm=2000, precision="double", seed=0)
    assert out.attrs["exact"] and out.attrs["statistic"] == "mixed-effects score z"
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    stats = np.empty((flips.shape[0], v))
    for voxel in range(v):
        present = np.isfinite(y[:, voxel])
        yv, sv = y[present, voxel], s[present, voxel]
        w = 1.0 / (sv + _null_tau2_plain(yv, sv))  # the same for every flip: y^2 only
        for b, signs in enumerate(flips):
            stats[b, voxel] = np.sum(w * signs[present] * yv) / np.sqrt(np.sum(w))
    np.testing.assert_allclose(out["t"], stats[0], rtol=1e-6)
    p = [_count_at_least(stats[:, k], stats[0, k]) / len(flips) for k in range(v)]
    np.testing.assert_array_equal(out["p"], p)
    with pytest.raises(DesignError, match="signflip"):
        permutation_test(ds, design, model="mixed", scheme="both")


def _plain_tfce(volume: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """fslmaths/nilearn TFCE: 100 heights up to the map's maximum, no dh factor."""
    from scipy import ndimage

    out = np.zeros_like(volume)
    top = volume.max()
    if top <= 0:
        return out
    for h in np.linspace(0.0, top, 101)[1:]:
        labels, _ = ndimage.label(volume >= h, structure)
        sizes = np.bincount(labels.ravel())
        inside = labels > 0
        out[inside] += sizes[labels[inside]] ** 0.5 * h**2
    return out


def _plain_clusters(volume: np.ndarray, threshold: float, structure: np.ndarray) -> tuple:
    from scipy import ndimage

    labels, k = ndimage.label(volume > threshold, structure)
    if k == 0:
        return 0.0, 0.0, labels, np.zeros(1), np.zeros(1)
    extent = np.bincount(labels.ravel())[1:].astype(float)
    mass = ndimage.sum(volume - threshold, labels, np.arange(1, k + 1))
    return extent.max(), mass.max(), labels, extent, mass


def test_exact_tfce_and_cluster_p_values_equal_enumeration() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(16)
    n, shape, threshold = 9, (5, 5, 4), 2.0
    y = ndimage.gaussian_filter(rng.normal(size=(n, *shape)), (0, 1, 1, 1)) * 3
    y[:, 1:3, 1:3, :2] += 0.8
    ijk = np.indices(shape).reshape(3, -1)
    subjects = [f"sub-{i}" for i in range(n)]
    ds = xr.Dataset(
        {"effect": (("subject", "voxel"), y.reshape(n, -1))},
        coords={"subject": subjects, **{a: ("voxel", ijk[k]) for k, a in enumerate("ijk")}},
    )
    design = pd.DataFrame({"mean": 1.0}, index=subjects)
    out = permutation_test(
        ds, design, tfce=True, cluster_threshold=threshold, precision="double", seed=0
    )
    assert out.attrs["exact"] and out.sizes["rearrangement"] == 2**n
    faces = ndimage.generate_binary_structure(3, 1)
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    null = {"tfce": [], "extent": [], "mass": []}
    for signs in flips:
        flipped = signs[:, None, None, None] * y
        t = flipped.mean(0) / (flipped.std(0, ddof=1) / np.sqrt(n))
        null["tfce"].append(_plain_tfce(t, faces).max())
        extent, mass, *_ = _plain_clusters(t, threshold, faces)
        null["extent"].append(extent)
        null["mass"].append(mass)
    t_obs = y.mean(0) / (y.std(0, ddof=1) / np.sqrt(n))
    score = _plain_tfce(t_obs, faces).ravel()
    np.testing.assert_allclose(out["tfce"], score, rtol=1e-6)
    p_tfce = [_count_at_least(null["tfce"], s) / 2**n for s in score]
    np.testing.assert_array_equal(out["p_tfce_fwe"], p_tfce)
    _, _, labels, extents, masses = _plain_clusters(t_obs, threshold, faces)
    assert labels.max() > 0  # the planted blob forms a cluster
    for name, sizes in (("extent", extents), ("mass", masses)):
        p_cluster = np.array([_count_at_least(null[name], s) / 2**n for s in sizes])
        expected = np.where(labels > 0, p_cluster[np.maximum(labels - 1, 0)], 1.0).ravel()
        np.testing.assert_array_equal(out[f"p_cluster_{name}_fwe"], expected)
    np.testing.assert_allclose(np.sort(out["max_tfce"]), np.sort(null["tfce"]), rtol=1e-6)
