"""Statistical maps for inference: one 3D volume on a voxel grid, read as nilearn reads it.

:func:`load_map` turns a path or a nibabel image into a :class:`StatMap` (its values as
stored, its affine and header), with one clear error for anything that is not one 3D
volume on a known grid; :func:`check_same_grid` refuses two maps on different grids;
:func:`background_mask` is the voxel set nilearn uses when no mask is given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bigglm.exceptions import StoreError, not_a_regular_file
from bigglm.io.nifti import AFFINE_TOLERANCE

__all__ = [
    "StatMap",
    "background_mask",
    "check_same_grid",
    "load_map",
    "nifti_like",
    "read_mask",
]

logger = logging.getLogger(__name__)

#: What :func:`load_map` accepts: a NIfTI path or an image already in memory.
MapLike = str | os.PathLike[str] | nib.spatialimages.SpatialImage

#: Width (voxels) of the border nilearn's background mask reads the background from.
_BORDER = 2


@dataclass(frozen=True)
class StatMap:
    """One 3D map: values as stored (NaN kept), voxel-to-world affine, header, name.

    Attributes
    ----------
    data : numpy.ndarray
        The voxel values, shape ``(X, Y, Z)``, in the file's data type (scaled).
    affine : numpy.ndarray
        The 4x4 voxel-to-world affine (mm).
    header : nibabel.Nifti1Header
        The image's header, copied into images made from this map.
    name : str
        The path, or a description of an in-memory image, for messages.

    Examples
    --------
    >>> z = StatMap(np.array([[[1.5, np.nan]]]), np.eye(4), None, "z")
    >>> z.finite
    array([[[1.5, 0. ]]])
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any
    name: str

    @property
    def finite(self) -> np.ndarray:
        """The values with NaN and infinities as 0 (nilearn's ``ensure_finite``)."""
        return np.where(np.isfinite(self.data), self.data, 0).astype(self.data.dtype)


def load_map(img: MapLike, *, what: str = "the map") -> StatMap:
    """Read a 3D map (a 4D image of one volume counts as 3D) from a path or an image.

    Parameters
    ----------
    img : path or nibabel image
        A NIfTI file, or an image in memory.
    what : str
        What the map is, for messages (``"the stat map"``, ``"p_peak_fwe"``).

    Returns
    -------
    StatMap

    Raises
    ------
    StoreError
        If the file is missing or unreadable, the image has no affine, or it is not one
        3D volume.

    Examples
    --------
    >>> import nibabel, numpy as np
    >>> z = load_map(nibabel.Nifti1Image(np.zeros((2, 3, 4, 1)), np.eye(4)))
    >>> z.data.shape, z.name
    ((2, 3, 4), 'the map (an in-memory Nifti1Image)')
    >>> load_map(nibabel.Nifti1Image(np.zeros((2, 3)), np.eye(4)), what="the stat map")
    Traceback (most recent call last):
    ...
    bigglm.exceptions.StoreError: the stat map (an in-memory Nifti1Image): has shape (2, 3); ...
    """
    if isinstance(img, str | os.PathLike):
        path = Path(img).expanduser()
        image, name = _open(path), str(path)
    else:
        image, name = img, f"{what} (an in-memory {type(img).__name__})"
    if image.affine is None:
        raise StoreError(f"{name}: has no affine; give an image with its voxel-to-world affine")
    shape = tuple(int(n) for n in image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise StoreError(
            f"{name}: has shape {shape}; expected one 3D volume (a statistical map), "
            "select one volume first"
        )
    data = np.asanyarray(image.dataobj).reshape(shape[:3])
    if data.dtype.kind not in "biuf":
        raise StoreError(f"{name}: holds {data.dtype} values; expected real numbers")
    return StatMap(data, np.asarray(image.affine, dtype=np.float64), image.header.copy(), name)


def _open(path: Path) -> Any:
    """nibabel's image of ``path``, or a StoreError naming it."""
    problem = not_a_regular_file(path)
    if problem:
        raise StoreError(f"{path}: {problem}; give a .nii/.nii.gz file")
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises many types for bad files
        raise StoreError(f"{path}: cannot be read as NIfTI ({err}); is it a .nii/.nii.gz?") from err


def check_same_grid(other: StatMap, reference: StatMap) -> None:
    """Refuse ``other`` unless it lies on ``reference``'s grid (shape and affine).

    Affines may differ by :data:`bigglm.io.nifti.AFFINE_TOLERANCE` mm (NIfTI stores them
    as float32).

    Raises
    ------
    StoreError
        Naming both maps, their shapes or the largest affine difference.

    Examples
    --------
    >>> import nibabel, numpy as np
    >>> z = load_map(nibabel.Nifti1Image(np.zeros((2, 3, 4)), np.eye(4)), what="z")
    >>> p = load_map(nibabel.Nifti1Image(np.zeros((2, 3, 5)), np.eye(4)), what="p")
    >>> check_same_grid(z, z)
    >>> check_same_grid(p, z)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.StoreError: p (...): shape (2, 3, 5) differs from z (...) (2, 3, 4); ...
    """
    fix = "give maps of the same analysis, or resample one onto the other's grid"
    if other.data.shape != reference.data.shape:
        raise StoreError(
            f"{other.name}: shape {other.data.shape} differs from {reference.name} "
            f"{reference.data.shape}; {fix}"
        )
    difference = float(np.abs(other.affine - reference.affine).max())
    if difference > AFFINE_TOLERANCE:
        raise StoreError(
            f"{other.name}: affine differs from that of {reference.name} (largest "
            f"difference {difference:.3g} mm); {fix}"
        )


def read_mask(mask_img: MapLike, reference: StatMap) -> np.ndarray:
    """The non-zero finite voxels of a mask on ``reference``'s grid.

    Raises
    ------
    StoreError
        If the mask cannot be read, lies on another grid, or holds no voxel.

    Examples
    --------
    >>> z = load_map(nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4)), what="z")
    >>> mask = np.array([0, 1, 2, np.nan, 0, 0, 0, 0]).reshape(2, 2, 2)
    >>> int(read_mask(nib.Nifti1Image(mask, np.eye(4)), z).sum())
    2
    """
    mask = load_map(mask_img, what="mask_img")
    check_same_grid(mask, reference)
    inside = np.isfinite(mask.data) & (mask.data != 0)
    if not inside.any():
        raise StoreError(f"{mask.name}: the mask has no non-zero voxel; check the mask")
    return np.asarray(inside)


def background_mask(data: np.ndarray) -> np.ndarray:
    """The voxels nilearn analyses when no mask is given: those unlike the background.

    As nilearn's ``NiftiMasker(mask_strategy="background")``: the background is read
    from the map's border (2 voxels wide). If the border holds NaN, the mask is every
    non-NaN voxel; otherwise every voxel whose value differs from the border's median
    (for a map written with 0 outside the brain: the non-zero voxels; NaN inside the
    brain then counts as in the mask, with the value 0).

    Parameters
    ----------
    data : numpy.ndarray
        A 3D map, NaN kept.

    Returns
    -------
    numpy.ndarray
        Boolean, the shape of ``data``.

    Examples
    --------
    >>> data = np.zeros((6, 6, 6))
    >>> data[2:4, 2:4, 2:4] = [[[1.0, 0.0], [2.0, np.nan]], [[3.0, 4.0], [5.0, 6.0]]]
    >>> int(background_mask(data).sum())
    7
    >>> data[0, 0, 0] = np.nan  # a NaN background: every non-NaN voxel
    >>> int(background_mask(data).sum())
    214
    """
    b = _BORDER
    faces = (data[:b], data[-b:], data[:, :b], data[:, -b:], data[..., :b], data[..., -b:])
    border = np.concatenate([face.ravel() for face in faces])
    if np.isnan(border).any():
        return np.asarray(~np.isnan(data))
    return np.asarray(data != np.median(border))


def nifti_like(reference: StatMap, data: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image of ``data`` on ``reference``'s grid, with a copy of its header.

    As nilearn's ``new_img_like``: the header's zooms and transforms follow the affine.

    Examples
    --------
    >>> z = load_map(nib.Nifti1Image(np.zeros((2, 3, 4)), np.diag([2.0, 2.0, 3.0, 1.0])))
    >>> [float(v) for v in nifti_like(z, np.ones((2, 3, 4))).header.get_zooms()]
    [2.0, 2.0, 3.0]
    """
    return nib.Nifti1Image(data, reference.affine, header=reference.header.copy())
