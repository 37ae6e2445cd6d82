"""The computed EPI mask against nilearn's ``compute_epi_mask`` (the reference implementation)."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel
import numpy as np
import pytest

import bigglm
from bigglm.io.mask import compute_epi_mask

masking = pytest.importorskip("nilearn.masking")


def _nilearn_mask(img: nibabel.Nifti1Image, **kwargs: object) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's own deprecation chatter
        return np.asarray(masking.compute_epi_mask(img, **kwargs).get_fdata(), dtype=bool)


def test_converted_mask_equals_nilearn_on_real_data(example4d_niigz: Path, tmp_path: Path) -> None:
    """nibabel's real example4d series: the store's mask is nilearn's, voxel for voxel."""
    store = bigglm.convert(example4d_niigz, tmp_path / "run.zarr", tr=2.0)
    expected = _nilearn_mask(nibabel.load(example4d_niigz))
    got = bigglm.open_run(store).mask.values
    assert expected.sum() > 1000
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converted_mask_equals_nilearn_on_generated_data(write_nifti, brain_series, seed) -> None:
    data = brain_series((20, 22, 16), 8, seed=seed)
    path = write_nifti(data, "bold.nii.gz")
    store = bigglm.convert(path, path.parent / "run.zarr")
    np.testing.assert_array_equal(
        bigglm.open_run(store).mask.values, _nilearn_mask(nibabel.load(path))
    )


@pytest.mark.parametrize(
    "options",
    [
        {"opening": 0},
        {"opening": 1},
        {"opening": 2, "connected": False},
        {"lower_cutoff": 0.1, "upper_cutoff": 0.9},
    ],
)
def test_options_match_nilearn(functional_nii: Path, example4d_niigz: Path, options) -> None:
    for path in (functional_nii, example4d_niigz):
        img = nibabel.load(path)
        mean = img.get_fdata().mean(axis=-1)
        np.testing.assert_array_equal(
            compute_epi_mask(mean, **options), _nilearn_mask(img, **options)
        )


def test_nonfinite_mean_voxels_count_as_background(example4d_niigz: Path) -> None:
    """nilearn zeroes non-finite voxels of the mean before thresholding; so do we."""
    img = nibabel.load(example4d_niigz)
    data = img.get_fdata()
    data[:10, :10, :, 0] = np.nan
    data[60, 40, 10, 1] = np.inf
    nan_img = nibabel.Nifti1Image(data, img.affine)
    np.testing.assert_array_equal(compute_epi_mask(data.mean(axis=-1)), _nilearn_mask(nan_img))
