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
