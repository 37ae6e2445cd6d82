"""bigglm.inference.tables against nilearn's get_clusters_table and statsmodels.

* clusters_table's nilearn columns equal get_clusters_table's, row for row (sub-peaks,
  their order and names, cluster sizes, coordinates), on the realistic z maps of
  test_inference_thresholds_nilearn.py, one- and two-sided, with and without a cluster
  size threshold, and on binary clusters whose centre of mass lies outside them;
* the p value columns equal values read off the p maps plainly here (the q values from
  statsmodels' Benjamini–Hochberg over the mask);
* fdr_q_values equals statsmodels' multipletests(method="fdr_bh");
* write_table round-trips through pandas.read_csv and never replaces a user's file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from nilearn.reporting import get_clusters_table
from scipy import ndimage, stats
from stat_maps import AFFINE, SHAPE, mask_image, z_map
from statsmodels.stats.multitest import multipletests

from bigglm.exceptions import StoreError
from bigglm.inference.tables import COLUMNS, clusters_table, fdr_q_values, write_table
from bigglm.io.artefacts import kind_of

# bigglm follows nilearn 0.14's semantics (two-sided thresholded maps, the numbering of
# negative clusters, the table's dtypes); older nilearn (0.12, the oldest environment's)
# differs there, so these equalities are checked against nilearn 0.14 and later only.
pytest.importorskip("nilearn", minversion="0.14")

MAPS = {
    "float32-zero-outside": z_map(0)[0],
    "float64-nan-outside": z_map(1, dtype=np.float64, outside=np.nan)[0],
    "float32-nan-outside": z_map(2, outside=np.nan)[0],
}


def nilearn_table(stat_img: Any, stat_threshold: float, **options: Any) -> pd.DataFrame:
    """nilearn's table (its warnings, for no cluster or a peak off its plateau, aside)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_clusters_table(stat_img, stat_threshold, **options)


@pytest.mark.parametrize("variant", list(MAPS))
@pytest.mark.parametrize("stat_threshold", [2.3, 3.1])
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("cluster_threshold", [0, 10])
@pytest.mark.parametrize("min_distance", [8.0, 4.0])
def test_table_equals_nilearn(
    variant: str,
    stat_threshold: float,
    two_sided: bool,
    cluster_threshold: int,
    min_distance: float,
) -> None:
    options = dict(
        cluster_threshold=cluster_threshold, two_sided=two_sided, min_distance=min_distance
    )
    ours = clusters_table(MAPS[variant], stat_threshold, **options)
    theirs = nilearn_table(MAPS[variant], stat_threshold, **options)
    assert list(ours.columns) == list(COLUMNS)
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    assert len(ours) > 0


def test_tables_have_sub_peaks_and_negative_clusters() -> None:
    """The comparisons above cover sub-peaks and both signs (not only single peaks)."""
    table = clusters_table(MAPS["float32-zero-outside"], 2.3, two_sided=True, min_distance=4.0)
    names = table["Cluster ID"].astype(str)
    assert names.str.fullmatch(r"\d+[abc]").sum() >= 3
    assert (table["Peak Stat"] < 0).any() and (table["Peak Stat"] > 0).any()
    sub = names.str.fullmatch(r"\d+[abc]")
    assert (table.loc[sub, "Cluster Size (mm3)"] == "").all()


def binary_clusters() -> np.ndarray:
    """A ring (its centre of mass outside it), a cube with a plateau on a graded cube,
    and a slab touching three faces of the grid."""
    data = np.zeros((20, 21, 22))
    yy, xx = np.mgrid[:9, :9]
    radius2 = (yy - 4) ** 2 + (xx - 4) ** 2
    data[2:11, 2:11, 5] = (radius2 <= 16) & (radius2 >= 6)
    data[13:17, 0:4, 0:3] = 2.0
    data[14, 1, 1] = data[15, 2, 1] = 3.0
    data[0:3, 15:21, 18:22] = 1.0
    return data


OBLIQUE = np.array(
    [[2.9, 0.3, 0.1, -40.2], [-0.2, 3.1, 0.05, 12.7], [0.1, -0.1, 2.7, -3.3], [0, 0, 0, 1.0]]
)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("affine", [np.eye(4), OBLIQUE], ids=["identity", "oblique"])
@pytest.mark.parametrize("min_distance", [8.0, 2.0, 0.5])
def test_binary_and_plateau_clusters_equal_nilearn(
    sign: int, affine: np.ndarray, min_distance: float
) -> None:
    img = nib.Nifti1Image(sign * binary_clusters(), affine)
    ours = clusters_table(img, 0.5, two_sided=True, min_distance=min_distance)
    theirs = nilearn_table(img, 0.5, two_sided=True, min_distance=min_distance)
    pd.testing.assert_frame_equal(ours, theirs, check_exact=False, rtol=0, atol=1e-12)


def test_no_cluster_gives_nilearns_empty_table() -> None:
    ours = clusters_table(MAPS["float32-zero-outside"], 50.0, two_sided=True)
    pd.testing.assert_frame_equal(ours, nilearn_table(MAPS["float32-zero-outside"], 50.0))
    assert ours.empty and list(ours.columns) == list(COLUMNS)


# --- the p value columns -------------------------------------------------------------


def voxel_of(table: pd.DataFrame, affine: np.ndarray) -> list[tuple[int, int, int]]:
    """Each row's voxel, from its mm coordinates."""
    xyz = table[["X", "Y", "Z"]].to_numpy(dtype=float)
    ijk = nib.affines.apply_affine(np.linalg.inv(affine), xyz)
    return [tuple(int(v) for v in np.rint(row)) for row in ijk]


def p_maps(z: np.ndarray, inside: np.ndarray, stat_threshold: float) -> dict[str, np.ndarray]:
    """Uncorrected one-sided p, Bonferroni-like FWE p, and a cluster p per cluster of
    either sign (0.001 times its label, 1 elsewhere), NaN outside the brain."""
    finite = np.where(np.isfinite(z), z, 0.0)
    uncorrected = np.where(inside, stats.norm.sf(finite), np.nan)
    fwe = np.where(inside, np.minimum(1.0, uncorrected * inside.sum()), np.nan)
    cluster = np.ones(z.shape)
    faces = ndimage.generate_binary_structure(3, 1)
    positive, n = ndimage.label(finite > stat_threshold, faces)
    negative, _ = ndimage.label(finite < -stat_threshold, faces)
    cluster[positive > 0] = 0.001 * positive[positive > 0]
    cluster[negative > 0] = 0.001 * (negative[negative > 0] + n)
    return {"uncorrected": uncorrected, "fwe": fwe, "cluster": cluster}


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("given_mask", [False, True])
def test_p_columns_are_the_maps_values(two_sided: bool, given_mask: bool) -> None:
    img, inside = z_map(1, dtype=np.float64, outside=np.nan)
    z = np.asarray(img.dataobj)
    maps = p_maps(z, inside, 2.3)
    maps["cluster"][12, 20, 15] = 1e-6  # p varies over one cluster: its smallest is shown
    mask = inside & (np.indices(SHAPE)[1] < 30)
    table = clusters_table(
        img,
        2.3,
        two_sided=two_sided,
        p_cluster_fwe=nib.Nifti1Image(maps["cluster"], AFFINE),
        p_peak_fwe=nib.Nifti1Image(maps["fwe"], AFFINE),
        p_peak_uncorrected=nib.Nifti1Image(maps["uncorrected"], AFFINE),
        mask_img=mask_image(mask) if given_mask else None,
    )
    pd.testing.assert_frame_equal(
        table[list(COLUMNS)], nilearn_table(img, 2.3, two_sided=two_sided), check_exact=True
    )
    region = mask if given_mask else inside
    q = np.full(SHAPE, np.nan)
    q[region] = multipletests(maps["uncorrected"][region], method="fdr_bh")[1]
    assert table.columns[-3:].tolist() == ["P(FWE) cluster", "P(FWE) peak", "Q(FDR) peak"]
    faces = ndimage.generate_binary_structure(3, 1)
    for (_, row), ijk in zip(table.iterrows(), voxel_of(table, AFFINE), strict=True):
        assert row["P(FWE) peak"] == maps["fwe"][ijk]
        np.testing.assert_allclose(row["Q(FDR) peak"], q[ijk], rtol=1e-12)  # NaN: NaN
        if isinstance(row["Cluster ID"], str):  # a sub-peak: the cluster's p is on its peak
            assert np.isnan(row["P(FWE) cluster"])
            continue
        labels, _ = ndimage.label(np.sign(z[ijk]) * np.nan_to_num(z) > 2.3, faces)
        assert row["P(FWE) cluster"] == maps["cluster"][labels == labels[ijk]].min()
    assert (table["P(FWE) cluster"] == 1e-6).sum() == 1
    if given_mask:
        assert table["Q(FDR) peak"].isna().any()  # peaks outside the mask have no q


def test_p_columns_only_when_asked() -> None:
    img, inside = z_map(1, dtype=np.float64, outside=np.nan)
    fwe = p_maps(np.asarray(img.dataobj), inside, 3.1)["fwe"]
    table = clusters_table(img, 3.1, p_peak_fwe=nib.Nifti1Image(fwe, AFFINE))
    assert list(table.columns) == [*COLUMNS, "P(FWE) peak"]


def test_p_map_on_another_grid_names_both() -> None:
    img = MAPS["float32-zero-outside"]
    other = nib.Nifti1Image(np.zeros((40, 48, 39)), AFFINE)
    with pytest.raises(StoreError) as caught:
        clusters_table(img, 3.1, p_peak_fwe=other)
    message = str(caught.value)
    assert "p_peak_fwe" in message and "the stat map" in message
    assert "(40, 48, 39) differs" in message and "(40, 48, 40)" in message
    moved = AFFINE.copy()
    moved[:3, :3] *= 2.0 / 3.0
    with pytest.raises(StoreError, match=r"p_cluster_fwe .*affine differs from that of the stat"):
        clusters_table(img, 3.1, p_cluster_fwe=nib.Nifti1Image(np.zeros(SHAPE), moved))


def test_log_p_map_is_refused() -> None:
    img = MAPS["float32-zero-outside"]
    log_p = nib.Nifti1Image(np.full(SHAPE, 2.5), AFFINE)
    with pytest.raises(StoreError, match=r"expected p values in \[0, 1\].*10 \*\* -map"):
        clusters_table(img, 3.1, p_peak_uncorrected=log_p)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"stat_threshold": -2.0}, "stat_threshold=-2.0; expected 0 or more"),
        ({"stat_threshold": 2.0, "min_distance": 0}, "min_distance=0; expected a positive"),
        ({"stat_threshold": 2.0, "cluster_threshold": -3}, "cluster_threshold=-3"),
    ],
)
def test_bad_options(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        clusters_table(MAPS["float32-zero-outside"], **options)


def test_not_a_volume_on_a_grid() -> None:
    with pytest.raises(StoreError, match=r"the stat map .*has shape \(40, 48\); expected one 3D"):
        clusters_table(nib.Nifti1Image(np.zeros((40, 48)), AFFINE), 3.1)
    with pytest.raises(StoreError, match=r"the stat map .*has no affine; give an image with"):
        clusters_table(nib.Nifti1Image(np.zeros(SHAPE), None), 3.1)


# --- fdr_q_values --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_fdr_q_values_equal_statsmodels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(size=500), rng.uniform(0, 1e-4, 50), [0.0, 1.0, 1.0]])
    p = np.round(p, 3 if seed % 2 else 12)  # ties, for odd seeds
    rng.shuffle(p)
    expected = multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(fdr_q_values(p), expected, rtol=1e-12, atol=0)
    grid = p[:550].reshape(22, 25)
    np.testing.assert_allclose(
        fdr_q_values(grid).ravel(), multipletests(grid.ravel(), method="fdr_bh")[1], rtol=1e-12
    )


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(1, 60), elements=st.floats(0.0, 1.0)))
def test_fdr_q_values_property(p: np.ndarray) -> None:
    q = fdr_q_values(p)
    np.testing.assert_allclose(q, multipletests(p, method="fdr_bh")[1], rtol=1e-12, atol=1e-300)
    order = np.argsort(p, kind="stable")
    assert (np.diff(q[order]) >= 0).all() and (q >= p).all() and (q <= 1).all()


def test_fdr_q_values_refuse_nan() -> None:
    with pytest.raises(ValueError, match=r"p values in \[0, 1\] without NaN"):
        fdr_q_values([0.1, np.nan])
    assert fdr_q_values([]).shape == (0,)


# --- write_table ---------------------------------------------------------------------


def full_table() -> pd.DataFrame:
    img, inside = z_map(1, dtype=np.float64, outside=np.nan)
    maps = p_maps(np.asarray(img.dataobj), inside, 2.3)
    return clusters_table(
        z_map(0)[0],
        2.3,
        two_sided=True,
        min_distance=4.0,
        p_cluster_fwe=nib.Nifti1Image(maps["cluster"], AFFINE),
        p_peak_fwe=nib.Nifti1Image(maps["fwe"], AFFINE),
        p_peak_uncorrected=nib.Nifti1Image(maps["uncorrected"], AFFINE),
    )


def test_write_table_round_trip(tmp_path: Path) -> None:
    table = full_table()
    path = write_table(table, tmp_path / "sub-01_clusters.tsv")
    assert path == tmp_path / "sub-01_clusters.tsv" and kind_of(path) == "cluster-table"
    text = path.read_text()
    assert text.splitlines()[0].split("\t") == list(table.columns)
    assert "n/a" in text and "nan" not in text.lower().replace("n/a", "")
    back = pd.read_csv(path, sep="\t")
    assert list(back.columns) == list(table.columns) and len(back) == len(table)
    assert back["Cluster ID"].astype(str).tolist() == table["Cluster ID"].astype(str).tolist()
    sizes = table["Cluster Size (mm3)"].replace("", np.nan).astype(float)
    np.testing.assert_array_equal(back["Cluster Size (mm3)"].to_numpy(), sizes.to_numpy())
    for column in ["X", "Y", "Z", "P(FWE) cluster", "P(FWE) peak", "Q(FDR) peak"]:
        np.testing.assert_array_equal(back[column].to_numpy(), table[column].to_numpy())
    np.testing.assert_array_equal(  # the float32 peaks, read back in float64
        back["Peak Stat"].to_numpy(np.float32), table["Peak Stat"].to_numpy()
    )
    assert (
        json.loads((tmp_path / "sub-01_clusters.json").read_text())["bigglm_artefact"]["kind"]
        == "cluster-table"
    )


def test_write_table_replaces_only_its_own(tmp_path: Path) -> None:
    table = full_table()
    path = write_table(table, tmp_path / "clusters.tsv")
    with pytest.raises(StoreError, match="already exists; pass overwrite=True"):
        write_table(table.head(2), path)
    write_table(table.head(2), path, overwrite=True)
    assert len(pd.read_csv(path, sep="\t")) == 2

    theirs = tmp_path / "mine.tsv"
    theirs.write_text("a\tb\n1\t2\n")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="is a file not written by bigglm; refusing"):
            write_table(table, theirs, overwrite=overwrite)
    assert theirs.read_text() == "a\tb\n1\t2\n" and not (tmp_path / "mine.json").exists()

    notes = tmp_path / "other.json"
    notes.write_text('{"mine": true}')
    with pytest.raises(StoreError, match=r"is not bigglm's record of other\.tsv"):
        write_table(table, tmp_path / "other.tsv")
    assert notes.read_text() == '{"mine": true}' and not (tmp_path / "other.tsv").exists()

    edited = path.read_text().replace("\t", "\t ", 1)
    path.write_text(edited)  # edited by hand: no longer bigglm's
    with pytest.raises(StoreError, match="not written by bigglm"):
        write_table(table, path, overwrite=True)
    assert path.read_text() == edited


def test_write_table_needs_tsv(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"clusters.csv: a cluster table is written as TSV"):
        write_table(full_table(), tmp_path / "clusters.csv")
    empty = write_table(clusters_table(z_map(0)[0], 50.0), tmp_path / "empty.tsv")
    assert empty.read_text() == "\t".join(COLUMNS) + "\n"
