"""bigglm.inference.thresholds.threshold against nilearn's threshold_stats_img.

On realistic smooth z maps (40 x 48 x 40, an irregular brain-like mask, planted blobs),
written as nilearn writes them (float32, 0 outside the brain) and as bigglm does
(NaN outside): the thresholded image and the threshold are nilearn's exactly, for
every height control, one- and two-sided, with and without cluster-extent thresholding
and a mask.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from nilearn.glm import threshold_stats_img
from stat_maps import AFFINE, SHAPE, mask_image, z_map

from bigglm.exceptions import StoreError
from bigglm.inference.thresholds import apply_threshold, fdr_threshold, threshold

# bigglm follows nilearn 0.14's semantics (two-sided thresholded maps, the numbering of
# negative clusters, the table's dtypes); older nilearn (0.12, the oldest environment's)
# differs there, so these equalities are checked against nilearn 0.14 and later only.
pytest.importorskip("nilearn", minversion="0.14")


def nilearn_threshold(stat_img: Any, **options: Any) -> tuple[nib.Nifti1Image, float]:
    """nilearn's answer (its own warnings, about its defaults and empty results, aside)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return threshold_stats_img(stat_img, **options)


def assert_same(ours: tuple[nib.Nifti1Image, float], theirs: tuple[nib.Nifti1Image, float]) -> None:
    image, cut = ours
    expected_image, expected_cut = theirs
    assert cut == float(expected_cut)
    assert np.array_equal(image.get_fdata(), expected_image.get_fdata())
    assert np.asarray(image.dataobj).dtype == np.asarray(expected_image.dataobj).dtype
    assert np.array_equal(image.affine, expected_image.affine)


def maps() -> dict[str, tuple[nib.Nifti1Image, np.ndarray]]:
    """The map variants: nilearn-style, bigglm-style, and 0 outside with NaN inside."""
    zero, inside = z_map(0)
    holes = np.asarray(zero.dataobj).copy()
    holes[20, 20:23, 18] = np.nan  # in the brain: nilearn's background mask keeps them, as 0
    return {
        "float32-zero-outside": (zero, inside),
        "float64-nan-outside": z_map(1, dtype=np.float64, outside=np.nan),
        "float32-nan-inside": (nib.Nifti1Image(holes, AFFINE), inside),
    }


MAPS = maps()


def masks(inside: np.ndarray) -> dict[str, nib.Nifti1Image | None]:
    """No mask; part of the brain; the brain grown by two voxels (beyond the map's
    support, where it is 0 or NaN)."""
    from scipy import ndimage

    part = inside & (np.indices(SHAPE)[0] < 26)
    grown = ndimage.binary_dilation(inside, iterations=2)
    return {"none": None, "part": mask_image(part), "grown": mask_image(grown)}


CONTROLS = [("fpr", 0.001), ("fdr", 0.05), ("bonferroni", 0.05)]


@pytest.mark.parametrize("variant", list(MAPS))
@pytest.mark.parametrize("mask", ["none", "part", "grown"])
@pytest.mark.parametrize(("height_control", "alpha"), CONTROLS)
@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize("cluster_threshold", [0, 10])
def test_threshold_equals_nilearn(
    variant: str,
    mask: str,
    height_control: Any,
    alpha: float,
    two_sided: bool,
    cluster_threshold: int,
) -> None:
    img, inside = MAPS[variant]
    mask_img = masks(inside)[mask]
    options = dict(
        alpha=alpha,
        height_control=height_control,
        cluster_threshold=cluster_threshold,
        two_sided=two_sided,
        mask_img=mask_img,
    )
    ours = threshold(img, **options)
    assert_same(ours, nilearn_threshold(img, **options))
    assert np.count_nonzero(ours[0].get_fdata()) > 0  # the blobs pass every control


@pytest.mark.parametrize(
    ("stat_threshold", "two_sided"), [(2.5, True), (2.5, False), (-2.5, False), (0.0, True)]
)
@pytest.mark.parametrize("cluster_threshold", [0, 10])
def test_explicit_threshold_equals_nilearn(
    stat_threshold: float, two_sided: bool, cluster_threshold: int
) -> None:
    """height_control=None: nilearn's ``threshold`` is our ``stat_threshold``."""
    img, inside = MAPS["float32-zero-outside"]
    for mask_img in (None, masks(inside)["part"]):
        ours = threshold(
            img,
            height_control=None,
            stat_threshold=stat_threshold,
            cluster_threshold=cluster_threshold,
            two_sided=two_sided,
            mask_img=mask_img,
        )
        theirs = nilearn_threshold(
            img,
            height_control=None,
            threshold=stat_threshold,
            cluster_threshold=cluster_threshold,
            two_sided=two_sided,
            mask_img=mask_img,
        )
        assert_same(ours, theirs)


def test_fdr_without_discovery_equals_nilearn() -> None:
    """No voxel passes: the threshold is inf and the image all 0, as nilearn's."""
    img, _ = MAPS["float64-nan-outside"]
    weak = nib.Nifti1Image(np.asarray(img.dataobj) * 0.1, AFFINE)
    ours = threshold(weak, alpha=0.01, height_control="fdr")
    assert_same(ours, nilearn_threshold(weak, alpha=0.01, height_control="fdr"))
    assert ours[1] == np.inf and not ours[0].get_fdata().any()


@pytest.mark.parametrize("name", ["z.nii", "z.nii.gz"])
def test_paths_equal_images(tmp_path: Path, name: str) -> None:
    img, inside = MAPS["float32-zero-outside"]
    nib.save(img, tmp_path / name)
    nib.save(masks(inside)["part"], tmp_path / "mask.nii.gz")
    options: dict[str, Any] = dict(height_control="fdr", alpha=0.05, cluster_threshold=10)
    ours = threshold(str(tmp_path / name), mask_img=tmp_path / "mask.nii.gz", **options)
    theirs = nilearn_threshold(
        str(tmp_path / name), mask_img=str(tmp_path / "mask.nii.gz"), **options
    )
    assert_same(ours, theirs)


def test_fdr_threshold_equals_nilearn() -> None:
    from nilearn.glm import fdr_threshold as nilearn_fdr

    rng = np.random.default_rng(3)
    z = np.concatenate([rng.standard_normal(5000), rng.normal(4.0, 1.0, 200)])
    for alpha in (0.001, 0.05, 0.2, 1.0):
        assert fdr_threshold(z, alpha) == float(nilearn_fdr(z, alpha))
        assert fdr_threshold(z.astype(np.float32), alpha) == float(
            nilearn_fdr(z.astype(np.float32), alpha)
        )


def test_apply_threshold_keeps_input() -> None:
    data = np.array([[[1.0, 4.0, -4.0]]])
    out = apply_threshold(data, 3.0, two_sided=True)
    assert out.tolist() == [[[0.0, 4.0, -4.0]]] and data.tolist() == [[[1.0, 4.0, -4.0]]]


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"height_control": "holm"}, "height_control='holm'; expected one of"),
        ({"alpha": 1.5}, "alpha=1.5; expected a probability between 0 and 1"),
        ({"cluster_threshold": -1}, "cluster_threshold=-1"),
        ({"height_control": None}, "height_control=None needs stat_threshold"),
        ({"stat_threshold": 3.0}, "is used only with height_control=None"),
        ({"height_control": None, "stat_threshold": -2.0}, "give |threshold|"),
    ],
)
def test_bad_options_say_what_to_do(options: dict[str, Any], words: str) -> None:
    img, _ = MAPS["float32-zero-outside"]
    with pytest.raises(ValueError, match=re.escape(words)):
        threshold(img, **options)


def test_mask_on_another_grid_names_both() -> None:
    img, inside = MAPS["float32-zero-outside"]
    moved_affine = AFFINE.copy()
    moved_affine[0, 3] += 3.0
    moved = nib.Nifti1Image(inside.astype(np.uint8), moved_affine)
    with pytest.raises(StoreError, match=r"mask_img .*affine differs from that of the stat map"):
        threshold(img, mask_img=moved)
    small = nib.Nifti1Image(inside[:-1].astype(np.uint8), AFFINE)
    with pytest.raises(StoreError, match=r"shape \(39, 48, 40\) differs from the stat map"):
        threshold(img, mask_img=small)
    empty = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE)
    with pytest.raises(StoreError, match="the mask has no non-zero voxel"):
        threshold(img, mask_img=empty)


def test_maps_that_are_not_one_volume(tmp_path: Path) -> None:
    series = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    with pytest.raises(StoreError, match=r"has shape \(4, 4, 4, 3\); expected one 3D volume"):
        threshold(series)
    with pytest.raises(StoreError, match=r"z\.nii\.gz: does not exist"):
        threshold(tmp_path / "z.nii.gz")
    (tmp_path / "z.nii").write_text("not a nifti")
    with pytest.raises(StoreError, match="cannot be read as NIfTI"):
        threshold(tmp_path / "z.nii")
    one = nib.Nifti1Image(np.full((4, 4, 4, 1), 5.0, np.float32), np.eye(4))
    image, _ = threshold(one)  # one volume in 4D counts as 3D
    assert image.shape == (4, 4, 4) and image.get_fdata().min() == 5.0
    with pytest.raises(StoreError, match="no voxel inside its mask, so 'fdr'"):
        threshold(one, height_control="fdr")  # a constant map is all background
