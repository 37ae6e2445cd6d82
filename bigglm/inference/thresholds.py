"""Parametric voxel-level thresholds of z maps, with nilearn's semantics.

:func:`threshold` is nilearn's ``nilearn.glm.threshold_stats_img`` for a volume: alpha
is turned into a z threshold by the chosen height control (an uncorrected false
positive rate, Benjamini–Hochberg's false discovery rate, or Bonferroni's family-wise
rate over the voxels of the mask), values below it are set to 0, then clusters smaller
than ``cluster_threshold`` voxels (6-connected, each sign apart) are removed.
:func:`apply_threshold` is that last step alone (nilearn's ``threshold_img``) and
:func:`fdr_threshold` the Benjamini–Hochberg z threshold.
"""

from __future__ import annotations

import logging
from typing import get_args

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

from bigglm.exceptions import StoreError
from bigglm.inference.maps import MapLike, background_mask, load_map, nifti_like, read_mask
from bigglm.typing import HeightControl

__all__ = ["apply_threshold", "fdr_threshold", "threshold"]

logger = logging.getLogger(__name__)

#: Face connectivity (6 neighbours, AFNI's NN1), which nilearn's clusters use.
FACES = ndimage.generate_binary_structure(3, 1)


def threshold(
    stat_img: MapLike,
    *,
    alpha: float = 0.001,
    height_control: HeightControl | None = "fpr",
    stat_threshold: float | None = None,
    cluster_threshold: int = 0,
    two_sided: bool = True,
    mask_img: MapLike | None = None,
) -> tuple[nib.Nifti1Image, float]:
    """Threshold a z map at a corrected or uncorrected voxel level, then by cluster size.

    The semantics of nilearn's ``threshold_stats_img``: alpha is halved when
    ``two_sided``; ``"fpr"`` thresholds at the z of alpha, ``"fdr"`` at
    Benjamini–Hochberg's z (:func:`fdr_threshold`, over ``|z|`` when ``two_sided``) and
    ``"bonferroni"`` at the z of alpha over the number of voxels in the mask.

    Parameters
    ----------
    stat_img : path or nibabel image
        A 3D map of z values.
    alpha : float
        The false positive rate, false discovery rate or family-wise error rate.
    height_control : {"fpr", "fdr", "bonferroni"} or None
        How alpha becomes a z threshold; None: use ``stat_threshold`` as it is.
    stat_threshold : float, optional
        The z threshold, with ``height_control=None`` only (required then).
    cluster_threshold : int
        Clusters (6-connected, positive and negative apart) of fewer voxels than this
        are removed.
    two_sided : bool
        Keep ``|z| >= threshold`` (both tails) rather than ``z >= threshold``.
    mask_img : path or nibabel image, optional
        On the map's grid; its non-zero finite voxels are counted (FDR, Bonferroni) and
        kept, all others set to 0. Without one, as nilearn: the voxels unlike the map's
        background (:func:`bigglm.inference.maps.background_mask`) are counted, and no
        voxel is set to 0 for being outside them.

    Returns
    -------
    image : nibabel.Nifti1Image
        The map (NaN as 0) with the values that pass kept and 0 elsewhere.
    threshold : float
        The z threshold used (``inf`` when no voxel passes FDR).

    Raises
    ------
    ValueError
        For an alpha outside [0, 1], an unknown ``height_control``, a negative
        ``cluster_threshold``, or ``stat_threshold`` missing or given when unused.
    StoreError
        If a map cannot be read, is not 3D, the mask lies on another grid, or the mask
        holds no voxel.

    Examples
    --------
    >>> z = np.zeros((5, 5, 5))
    >>> z[1:3, 1:3, 1:3], z[4, 4, 4] = 5.0, -4.0
    >>> image, cut = threshold(nib.Nifti1Image(z, np.eye(4)), alpha=0.001)
    >>> round(cut, 3), int((image.get_fdata() != 0).sum())
    (3.291, 9)
    >>> image, _ = threshold(nib.Nifti1Image(z, np.eye(4)), cluster_threshold=2)
    >>> int((image.get_fdata() != 0).sum())
    8
    >>> image, cut = threshold(nib.Nifti1Image(z, np.eye(4)), height_control="bonferroni")
    >>> round(cut, 3)  # over the 9 non-background voxels
    3.865
    """
    _check_options(alpha, height_control, stat_threshold, cluster_threshold, two_sided)
    stat = load_map(stat_img, what="the stat map")
    inside = background_mask(stat.data) if mask_img is None else read_mask(mask_img, stat)
    values = stat.finite
    z = values[inside]
    cutoff = _height(z, alpha, height_control, stat_threshold, two_sided)
    if mask_img is not None:
        values[~inside] = 0
    logger.info("z threshold %.4g (%s, alpha %g)", cutoff, height_control, alpha)
    kept = apply_threshold(values, cutoff, two_sided=two_sided, cluster_threshold=cluster_threshold)
    return nifti_like(stat, kept), cutoff


def _check_options(
    alpha: float,
    height_control: HeightControl | None,
    stat_threshold: float | None,
    cluster_threshold: int,
    two_sided: bool,
) -> None:
    """Refuse option values :func:`threshold` cannot use, saying which and why."""
    controls = get_args(HeightControl)
    if height_control is not None and height_control not in controls:
        raise ValueError(f"height_control={height_control!r}; expected one of {controls} or None")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}; expected a probability between 0 and 1")
    if cluster_threshold < 0:
        raise ValueError(f"cluster_threshold={cluster_threshold}; expected 0 or more voxels")
    if height_control is None and stat_threshold is None:
        raise ValueError("height_control=None needs stat_threshold, the z threshold to use")
    if height_control is not None and stat_threshold is not None:
        raise ValueError(
            f"stat_threshold={stat_threshold} is used only with height_control=None; "
            f"with {height_control!r} the threshold comes from alpha, drop stat_threshold"
        )
    if two_sided and stat_threshold is not None and stat_threshold < 0:
        raise ValueError(
            f"stat_threshold={stat_threshold} with two_sided=True; give |threshold| "
            "(both tails are kept), or two_sided=False to keep the values below it"
        )


def _height(
    z: np.ndarray,
    alpha: float,
    height_control: HeightControl | None,
    stat_threshold: float | None,
    two_sided: bool,
) -> float:
    """The z threshold of a height control over the in-mask values ``z``."""
    if stat_threshold is not None:  # given exactly when height_control is None
        return float(stat_threshold)
    tail = alpha / 2 if two_sided else alpha
    if height_control == "fpr":
        return float(stats.norm.isf(tail))
    if z.size == 0:
        raise StoreError(
            f"the stat map has no voxel inside its mask, so {height_control!r} has nothing "
            "to count; check the map (a constant map is all background) or give mask_img"
        )
    if height_control == "bonferroni":
        return float(stats.norm.isf(tail / z.size))
    return fdr_threshold(np.abs(z) if two_sided else z, tail)


def fdr_threshold(z: np.ndarray, alpha: float) -> float:
    """Benjamini–Hochberg's z threshold: the false discovery rate of ``z >= it`` is alpha.

    As nilearn's ``fdr_threshold``: the z values are sorted in decreasing order, their
    one-sided p values compared with ``alpha * rank / n``; the threshold is the smallest
    z whose p value passes, less 1e-12 (in the values' own precision), or ``inf`` when
    none passes.

    Parameters
    ----------
    z : numpy.ndarray
        z values, one per voxel (any shape).
    alpha : float
        The false discovery rate, between 0 and 1.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If alpha is outside [0, 1].

    Examples
    --------
    >>> round(fdr_threshold(np.array([4.0, 3.5, 2.8, 2.5, 1.9, 1.2]), 0.05), 6)
    1.9
    >>> fdr_threshold(np.array([0.5, 0.1]), 0.05)
    inf
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}; expected a false discovery rate between 0 and 1")
    descending = -np.sort(-np.ravel(z))
    n = descending.size
    passed = stats.norm.sf(descending) < alpha * np.linspace(1 / max(n, 1), 1, n)
    if not passed.any():
        return float("inf")
    return float(descending[np.flatnonzero(passed)[-1]] - 1e-12)


def apply_threshold(
    data: np.ndarray, cutoff: float, *, two_sided: bool, cluster_threshold: int = 0
) -> np.ndarray:
    """Set values that do not pass ``cutoff`` to 0, then clusters smaller than a size.

    As nilearn's ``threshold_img``: with ``two_sided``, values in ``(-cutoff, cutoff)``
    become 0; otherwise values below a non-negative ``cutoff`` (above a negative one).
    Then clusters of non-zero values (6-connected, positive and negative apart) of
    fewer than ``cluster_threshold`` voxels become 0.

    Parameters
    ----------
    data : numpy.ndarray
        A 3D array of finite values (not modified).
    cutoff : float
        The threshold, in the values' units.
    two_sided : bool
        Keep both tails (``|value| >= cutoff``).
    cluster_threshold : int
        The smallest cluster kept, in voxels.

    Returns
    -------
    numpy.ndarray
        A thresholded copy of ``data``.

    Raises
    ------
    ValueError
        If ``cutoff`` is negative with ``two_sided``.

    Examples
    --------
    >>> data = np.array([[[0.5, 3.0, 3.2, -3.5, 0.0, 4.0]]])
    >>> apply_threshold(data, 3.0, two_sided=True)
    array([[[ 0. ,  3. ,  3.2, -3.5,  0. ,  4. ]]])
    >>> apply_threshold(data, 3.0, two_sided=False, cluster_threshold=2)
    array([[[0. , 3. , 3.2, 0. , 0. , 0. ]]])
    """
    if two_sided and cutoff < 0:
        raise ValueError(f"cutoff={cutoff} with two_sided=True; give |cutoff|")
    out = np.array(data, copy=True)
    cutoff = float(cutoff)  # compared in the values' own precision, as nilearn does
    if two_sided:
        out[(-cutoff < out) & (out < cutoff)] = 0
    elif cutoff >= 0:
        out[out < cutoff] = 0
    else:
        out[out > cutoff] = 0
    if cluster_threshold > 0:
        for sign in (1, -1):
            labels, _ = ndimage.label(out * sign > 0, FACES)
            small = np.bincount(labels.ravel()) < cluster_threshold
            small[0] = False
            out[small[labels]] = 0
    return out
