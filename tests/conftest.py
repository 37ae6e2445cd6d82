"""Shared fixtures: real NIfTI files from nibabel's test data and generated series."""

from __future__ import annotations

from pathlib import Path

import nibabel
import pytest

NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


@pytest.fixture(scope="session")
def functional_nii() -> Path:
    """nibabel's small real 4D fMRI series (uncompressed)."""
    return NIBABEL_DATA / "functional.nii"


@pytest.fixture(scope="session")
def example4d_niigz() -> Path:
    """nibabel's small real 4D series (gzip-compressed, int16 with scaling)."""
    return NIBABEL_DATA / "example4d.nii.gz"


# --- ingest (bigglm.io) ------------------------------------------------------------


def _brain_series(shape: tuple[int, int, int], n_volumes: int, seed: int):
    """A synthetic EPI-like series: a bright noisy ellipsoid on a dark noisy background."""
    import numpy as np

    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape, dtype=float)[:, None, None, None] - 1) / 2
    radius = np.array(shape, dtype=float)[:, None, None, None] * 0.35
    inside = (((grid - centre) / radius) ** 2).sum(axis=0) <= 1.0
    baseline = np.where(inside, 1000.0, 30.0)
    noise = rng.normal(0.0, 1.0, (*shape, n_volumes)) * np.where(inside, 20.0, 10.0)[..., None]
    return (baseline[..., None] + noise).astype(np.float32)


@pytest.fixture
def write_nifti(tmp_path: Path):
    """Factory: write an array as NIfTI in ``tmp_path`` with a given affine, TR and type.

    Float data saved with an integer ``dtype`` get nibabel's own scl_slope/scl_inter.
    """
    import numpy as np

    def write(
        data,
        name: str = "bold.nii",
        *,
        affine=None,
        tr: float | None = 2.0,
        time_unit: str = "sec",
        dtype=None,
    ) -> Path:
        affine = np.diag([3.0, 3.0, 3.5, 1.0]) if affine is None else affine
        img = nibabel.Nifti1Image(np.asarray(data), affine)
        if dtype is not None:
            img.set_data_dtype(dtype)
        img.header.set_xyzt_units("mm", time_unit)
        if tr is not None and np.ndim(data) == 4:
            img.header["pixdim"][4] = tr
        path = tmp_path / name
        nibabel.save(img, path)
        return path

    return write


@pytest.fixture
def brain_series():
    """Factory: ``brain_series(shape, n_volumes, seed)`` float32 EPI-like data."""
    return _brain_series
