"""Writing synthetic subject maps as real NIfTI files, as first-level tools write them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

#: A small grid (10 x 12 x 8 = 960 voxels) with a 2 mm affine off the origin.
SHAPE = (10, 12, 8)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-10.0, -12.0, -8.0]


def brain(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """An ellipsoid 'brain' filling most of the grid."""
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    radius = np.array(shape) / 2
    return np.sum(((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2, 0) < 1


def subject_maps(
    folder: Path,
    n_subjects: int,
    *,
    seed: int = 0,
    outside: float = np.nan,
    shrink: bool = False,
    suffix: str = ".nii.gz",
    with_variance: bool = True,
) -> tuple[list[Path], list[Path], np.ndarray, np.ndarray]:
    """Effect and variance maps of ``n_subjects`` subjects, written as BIDS-named files.

    Each subject's coverage is the brain minus (with ``shrink``) a random slab at its
    edge, so that voxels near the edge miss some subjects; ``outside`` is what the
    files hold outside coverage (NaN as SPM and bigglm, 0 as FSL and nilearn).

    Returns the effect paths, variance paths, the (S, X, Y, Z) effects with NaN outside
    coverage, and the (S, X, Y, Z) variances likewise.
    """
    rng = np.random.default_rng(seed)
    mask = brain()
    folder.mkdir(parents=True, exist_ok=True)
    effects, variances, effect_paths, variance_paths = [], [], [], []
    for s in range(n_subjects):
        cover = mask.copy()
        if shrink:
            axis, depth = rng.integers(0, 3), rng.integers(0, 3)
            index = [slice(None)] * 3
            index[axis] = slice(0, depth)
            cover[tuple(index)] = False
        effect = rng.normal(0.5, 1.0, size=SHAPE).astype(np.float32)
        variance = rng.uniform(0.1, 2.0, size=SHAPE).astype(np.float32)
        effect[~cover], variance[~cover] = np.nan, np.nan
        effects.append(effect)
        variances.append(variance)
        label = f"sub-{s + 1:03d}"
        for data, kind, paths in (
            (effect, "effect", effect_paths),
            (variance, "variance", variance_paths),
        ):
            if kind == "variance" and not with_variance:
                continue
            stored = np.where(np.isnan(data), np.float32(outside), data)
            path = folder / f"{label}_contrast-faces_stat-{kind}_statmap{suffix}"
            nib.save(nib.Nifti1Image(stored, AFFINE), path)
            paths.append(path)
    return effect_paths, variance_paths, np.stack(effects), np.stack(variances)
