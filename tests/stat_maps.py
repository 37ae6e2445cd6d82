"""Realistic synthetic z maps for the inference tests: smooth noise, planted blobs, an
irregular brain-like mask, a 3 mm affine with a flipped x axis off the origin."""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

SHAPE = (40, 48, 40)
AFFINE = np.array(
    [[-3.0, 0.0, 0.0, 60.0], [0.0, 3.0, 0.0, -80.0], [0.0, 0.0, 3.0, -50.0], [0, 0, 0, 1.0]]
)

#: (centre voxel, amplitude, width in voxels): positive and negative blobs, two close
#: together (a cluster with sub-peaks).
BLOBS = (
    ((12, 20, 15), 5.0, 2.0),
    ((16, 24, 15), 4.2, 1.5),
    ((28, 30, 22), -4.5, 2.5),
    ((20, 12, 28), 4.0, 1.5),
    ((22, 34, 12), 6.0, 3.0),
)


def brain_mask(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """An ellipsoid with a wobbly (smooth random) surface."""
    rng = np.random.default_rng(seed + 1000)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape, dtype=float) - 1) / 2
    radius = np.array(shape, dtype=float) * np.array([0.42, 0.45, 0.4])
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape), 4.0)
    distance = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0)
    return np.asarray(distance + 3.0 * wobble <= 1.0)


def z_values(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Smooth unit-variance noise plus the planted blobs, over the whole grid."""
    rng = np.random.default_rng(seed)
    z = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    z /= z.std()
    grid = np.indices(shape).astype(float)
    for centre, amplitude, width in BLOBS:
        squared = sum((grid[axis] - centre[axis]) ** 2 for axis in range(3))
        z += amplitude * np.exp(-squared / (2 * width**2))
    return z


def z_map(
    seed: int = 0, *, dtype: Any = np.float32, outside: float = 0.0
) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A z map with ``outside`` (0 as nilearn writes, NaN as bigglm) beyond its brain
    mask, and the mask."""
    inside = brain_mask(seed)
    z = z_values(seed)
    z[~inside] = outside
    return nib.Nifti1Image(z.astype(dtype), AFFINE), inside


def mask_image(inside: np.ndarray) -> nib.Nifti1Image:
    """A uint8 mask image on the maps' grid."""
    return nib.Nifti1Image(inside.astype(np.uint8), AFFINE)
