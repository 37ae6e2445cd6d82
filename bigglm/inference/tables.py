"""Cluster and peak tables of statistical maps, as nilearn's ``get_clusters_table``.

:func:`clusters_table` lists the clusters of a thresholded map (6-connected, each
sign apart, largest peak first) with their peak and up to three sub-peaks, and, given
p maps on the same grid, each row's cluster-wise and voxel-wise family-wise error p
values and its false discovery rate q value (:func:`fdr_q_values`). :func:`write_table`
writes a table as a BIDS-style TSV marked as bigglm's (a JSON sidecar).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from string import ascii_lowercase
from typing import Any

import numpy as np
import pandas as pd
from nibabel.affines import apply_affine
from numpy.typing import ArrayLike
from scipy import ndimage

from bigglm.exceptions import StoreError
from bigglm.inference.maps import (
    MapLike,
    StatMap,
    background_mask,
    check_same_grid,
    load_map,
    nifti_like,
    read_mask,
)
from bigglm.inference.thresholds import FACES, apply_threshold
from bigglm.io.artefacts import writing

__all__ = ["COLUMNS", "clusters_table", "fdr_q_values", "write_table"]

logger = logging.getLogger(__name__)

#: nilearn's columns, in its order; the p value columns follow them when asked for.
COLUMNS = ("Cluster ID", "X", "Y", "Z", "Peak Stat", "Cluster Size (mm3)")

#: Sub-peaks reported per cluster besides its peak (nilearn: "1a", "1b", "1c").
MAX_SUBPEAKS = 3


@dataclass(frozen=True)
class _Peak:
    """One row: a cluster's peak (``voxels`` its cluster) or one of its sub-peaks."""

    ident: int | str
    ijk: tuple[int, int, int]
    xyz: tuple[float, float, float]
    value: Any  # the map's own float type, as nilearn reports it
    size_mm3: int | str  # "" for a sub-peak
    voxels: tuple[np.ndarray, ...] | None  # the cluster's voxel indices, for a peak

    def row(self) -> list[Any]:
        return [self.ident, *self.xyz, self.value, self.size_mm3]


def clusters_table(
    stat_img: MapLike,
    stat_threshold: float,
    *,
    cluster_threshold: int = 0,
    two_sided: bool = False,
    min_distance: float = 8.0,
    p_cluster_fwe: MapLike | None = None,
    p_peak_fwe: MapLike | None = None,
    p_peak_uncorrected: MapLike | None = None,
    mask_img: MapLike | None = None,
) -> pd.DataFrame:
    """The clusters of a map above a threshold, their peaks and sub-peaks, as a table.

    nilearn's ``get_clusters_table`` for a volume, row for row: the map is thresholded
    (:func:`bigglm.inference.thresholds.apply_threshold`), clusters are the
    6-connected sets of values above ``stat_threshold`` (below ``-stat_threshold``
    too with ``two_sided``, numbered after the positive rows), ordered by their peak.
    Each cluster's local maxima (a plateau by its centre of mass, moved to the nearest
    voxel of the plateau when outside it) are sorted by value and pared: a maximum is
    dropped when it lies within ``min_distance`` mm of the last one kept before it.
    The peak row has the cluster's size; up to three sub-peaks follow ("1a", ...).

    Parameters
    ----------
    stat_img : path or nibabel image
        A 3D map where larger values are more significant (z, -log10 p).
    stat_threshold : float
        The cluster-forming threshold (0 or more), in the map's units.
    cluster_threshold : int
        Clusters of fewer voxels are left out.
    two_sided : bool
        List negative clusters (values below ``-stat_threshold``) too.
    min_distance : float
        The smallest distance (mm) between a cluster's reported maxima.
    p_cluster_fwe : path or nibabel image, optional
        Cluster-wise family-wise error p values (not -log10), on the map's grid: adds
        ``P(FWE) cluster``, on each peak row the smallest value over the cluster's
        voxels (the cluster's value when the map came from the same threshold).
    p_peak_fwe : path or nibabel image, optional
        Voxel-wise family-wise error p values: adds ``P(FWE) peak``, the value at each
        row's voxel.
    p_peak_uncorrected : path or nibabel image, optional
        Uncorrected voxel-wise p values: adds ``Q(FDR) peak``, each row's
        Benjamini–Hochberg q value (:func:`fdr_q_values`) over the mask.
    mask_img : path or nibabel image, optional
        The voxels over which q values are computed (non-zero, finite); by default, as
        :func:`bigglm.inference.thresholds.threshold` counts voxels, those unlike the
        stat map's background. Voxels where the p map is not finite are left out.

    Returns
    -------
    pandas.DataFrame
        :data:`COLUMNS` (coordinates in mm, the peak's value, the cluster's volume in
        mm³, "" on sub-peak rows), then the p columns asked for (NaN where none).

    Raises
    ------
    ValueError
        For a negative ``stat_threshold`` or ``cluster_threshold``, or a
        ``min_distance`` that is not positive.
    StoreError
        If a map cannot be read or is not 3D, a p map lies on another grid than the
        stat map or holds values outside [0, 1].

    Examples
    --------
    >>> import nibabel
    >>> z = np.zeros((9, 9, 9))
    >>> z[1:4, 1:4, 1:4] = 3.5
    >>> z[2, 2, 2], z[6, 6, 6] = 5.0, -4.0
    >>> clusters_table(nibabel.Nifti1Image(z, np.diag([2.0, 2.0, 2.0, 1.0])), 3.0)
      Cluster ID    X    Y    Z  Peak Stat  Cluster Size (mm3)
    0          1  4.0  4.0  4.0        5.0                 216
    >>> clusters_table(nibabel.Nifti1Image(z, np.eye(4)), 3.0, two_sided=True)["Peak Stat"]
    0    5.0
    1   -4.0
    Name: Peak Stat, dtype: float64
    """
    _check_table_options(stat_threshold, cluster_threshold, min_distance)
    stat = load_map(stat_img, what="the stat map")
    p_maps = _p_maps(stat, p_cluster_fwe, p_peak_fwe, p_peak_uncorrected)
    image = nifti_like(
        stat,
        apply_threshold(
            stat.finite, stat_threshold, two_sided=two_sided, cluster_threshold=cluster_threshold
        ),
    )
    data = np.asarray(image.dataobj)
    voxel_volume = np.prod(image.header.get_zooms())
    peaks: list[_Peak] = []
    for sign in (1, -1) if two_sided else (1,):
        found = _sign_peaks(data * sign, float(stat_threshold), stat.affine, min_distance)
        peaks += _numbered(found, sign, len(peaks), stat.affine, voxel_volume)
    table = pd.DataFrame(columns=list(COLUMNS), data=[p.row() for p in peaks] or None)
    return _with_p_columns(table, peaks, p_maps, stat, mask_img)


def _check_table_options(
    stat_threshold: float, cluster_threshold: int, min_distance: float
) -> None:
    if stat_threshold < 0:
        raise ValueError(
            f"stat_threshold={stat_threshold}; expected 0 or more (negative clusters are "
            "listed with two_sided=True; for them alone, negate the map)"
        )
    if cluster_threshold < 0:
        raise ValueError(f"cluster_threshold={cluster_threshold}; expected 0 or more voxels")
    if not min_distance > 0:
        raise ValueError(f"min_distance={min_distance}; expected a positive distance in mm")


def _p_maps(stat: StatMap, *maps: MapLike | None) -> list[StatMap | None]:
    """The p maps given, read and checked: on the stat map's grid, values in [0, 1]."""
    names = ("p_cluster_fwe", "p_peak_fwe", "p_peak_uncorrected")
    loaded: list[StatMap | None] = []
    for name, given in zip(names, maps, strict=True):
        if given is None:
            loaded.append(None)
            continue
        p = load_map(given, what=name)
        check_same_grid(p, stat)
        values = p.data[np.isfinite(p.data)]
        if values.size and (values.min() < 0 or values.max() > 1):
            raise StoreError(
                f"{p.name}: values from {values.min():.4g} to {values.max():.4g}; expected "
                f"p values in [0, 1] for {name} (for a -log10(p) map, give 10 ** -map)"
            )
        loaded.append(p)
    return loaded


def _sign_peaks(
    signed: np.ndarray, stat_threshold: float, affine: np.ndarray, min_distance: float
) -> list[tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]]:
    """Per cluster of ``signed > stat_threshold``, largest peak first: the reported
    maxima (voxel indices, values) and the cluster's voxels."""
    labels, n = ndimage.label(signed > stat_threshold, FACES)
    if n == 0:
        logger.info("no cluster with values beyond %g", stat_threshold)
        return []
    ids = np.arange(1, n + 1)
    order = np.argsort(-np.asarray(ndimage.maximum(signed, labels, ids)))
    boxes = ndimage.find_objects(labels)
    found = []
    for c in ids[order]:
        box = _even_box(boxes[c - 1], signed.shape)
        inside = labels[box] == c
        ijk, values = _cluster_maxima(signed[box] * inside, affine, box, min_distance)
        voxels = tuple(axis + s.start for axis, s in zip(np.nonzero(inside), box, strict=True))
        found.append((ijk, values, voxels))
    return found


def _even_box(box: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A cluster's bounding box with a margin of at least one voxel, starting at an even
    index: maxima and centres of mass found in it are those of the whole volume (a
    half-voxel centre rounds to even, so the offset must keep its parity)."""
    grown = []
    for s, n in zip(box, shape, strict=True):
        start = max(s.start - 1, 0)
        grown.append(slice(start - start % 2, min(s.stop + 1, n)))
    return tuple(grown)


def _cluster_maxima(
    masked: np.ndarray, affine: np.ndarray, box: tuple[slice, ...], min_distance: float
) -> tuple[np.ndarray, np.ndarray]:
    """A cluster's maxima (whole-volume voxel indices, values), largest first, pared."""
    ijk, values = _local_maxima(masked)
    ijk = ijk + np.array([s.start for s in box])
    order = np.argsort(-values)
    ijk, values = ijk[order], values[order]
    keep = _pared(apply_affine(affine, ijk), min_distance)
    return ijk[keep], values[keep]


def _local_maxima(masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The local maxima of one cluster's values (0 outside it): each connected plateau
    of voxels equal to the largest value around them, by its centre of mass (the
    plateau's nearest voxel when the centre is outside it). A plateau whose
    surroundings are all equal is no maximum, unless the whole cluster is constant."""
    high = ndimage.maximum_filter(masked, 3)
    maxima = (masked == high) & (masked != 0)
    values = masked[masked != 0]
    if not np.isclose(values.max(), values.min()):
        maxima &= (high - ndimage.minimum_filter(masked, 3)) > 0
    plateaus, n = ndimage.label(maxima)
    index = np.arange(1, n + 1)
    centres = np.array(ndimage.center_of_mass(masked, plateaus, index)).reshape(n, 3)
    ijk = np.round(centres).astype(int)
    outside = plateaus[tuple(ijk.T)] != index
    for row in np.flatnonzero(outside):
        members = np.argwhere(plateaus == index[row])
        ijk[row] = members[np.argmin(np.linalg.norm(members - ijk[row], axis=1))]
    if outside.any():
        logger.info("%d maxima lie outside their plateau; using its nearest voxel", outside.sum())
    return ijk, masked[tuple(ijk.T)]


def _pared(xyz: np.ndarray, min_distance: float) -> np.ndarray:
    """Which maxima (sorted, largest first) to keep: each kept maximum decides whether
    every later one lies farther than ``min_distance`` from it, the last kept deciding
    (nilearn's rule, which can keep a maximum near an earlier kept one)."""
    keep = np.ones(len(xyz), dtype=bool)
    for i in range(len(xyz)):
        if keep[i]:
            keep[i + 1 :] = np.linalg.norm(xyz[i + 1 :] - xyz[i], axis=1) > min_distance
    return keep


def _numbered(
    found: list[tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]],
    sign: int,
    offset: int,
    affine: np.ndarray,
    voxel_volume: Any,
) -> list[_Peak]:
    """Rows of one sign's clusters: the peak numbered ``offset + k + 1`` (nilearn's
    ``offset`` is the number of rows before, sub-peaks included), then its sub-peaks."""
    rows: list[_Peak] = []
    for k, (ijk, values, voxels) in enumerate(found):
        size = int(len(voxels[0]) * voxel_volume)
        for m in range(min(len(values), MAX_SUBPEAKS + 1)):
            ident: int | str = (
                offset + k + 1 if m == 0 else f"{offset + k + 1}{ascii_lowercase[m - 1]}"
            )
            point = (int(ijk[m, 0]), int(ijk[m, 1]), int(ijk[m, 2]))
            rows.append(
                _Peak(
                    ident,
                    point,
                    _world(affine, point),
                    values[m] * sign,
                    size if m == 0 else "",
                    voxels if m == 0 else None,
                )
            )
    return rows


def _world(affine: np.ndarray, ijk: tuple[int, int, int]) -> tuple[float, float, float]:
    """The mm coordinates of a voxel, as nilearn's ``coord_transform`` computes them."""
    x, y, z, _ = np.dot(affine, np.array([*ijk, 1]))
    return float(x), float(y), float(z)


def _with_p_columns(
    table: pd.DataFrame,
    peaks: list[_Peak],
    p_maps: list[StatMap | None],
    stat: StatMap,
    mask_img: MapLike | None,
) -> pd.DataFrame:
    """``table`` with the p value columns of the maps given."""
    cluster, peak, uncorrected = p_maps
    if cluster is not None:
        table["P(FWE) cluster"] = [_cluster_p(cluster.data, row.voxels) for row in peaks]
    if peak is not None:
        table["P(FWE) peak"] = [float(peak.data[row.ijk]) for row in peaks]
    if uncorrected is not None:
        inside = background_mask(stat.data) if mask_img is None else read_mask(mask_img, stat)
        inside &= np.isfinite(uncorrected.data)
        q = np.full(stat.data.shape, np.nan)
        q[inside] = fdr_q_values(uncorrected.data[inside])
        table["Q(FDR) peak"] = [float(q[row.ijk]) for row in peaks]
    return table


def _cluster_p(p: np.ndarray, voxels: tuple[np.ndarray, ...] | None) -> float:
    """The smallest finite p value over a cluster's voxels (NaN on sub-peak rows)."""
    if voxels is None:
        return float("nan")
    values = p[voxels]
    values = values[np.isfinite(values)]
    if values.size and values.min() != values.max():
        logger.debug("cluster p values differ over one cluster; reporting the smallest")
    return float(values.min()) if values.size else float("nan")


def fdr_q_values(p: ArrayLike) -> np.ndarray:
    """Benjamini–Hochberg q values: the smallest false discovery rate at which each
    test would be a discovery (adjusted p values, monotone in p, at most 1).

    ``q`` of the ``k``-th smallest of ``n`` p values is the minimum over ``j >= k`` of
    ``p_(j) * n / j``, as ``statsmodels.stats.multitest.multipletests(method="fdr_bh")``.

    Parameters
    ----------
    p : array_like
        p values in [0, 1], any shape, no NaN.

    Returns
    -------
    numpy.ndarray
        The q values, float64, in the shape of ``p``.

    Raises
    ------
    ValueError
        For NaN or values outside [0, 1].

    Examples
    --------
    >>> fdr_q_values([0.01, 0.03, 0.02, 0.5])
    array([0.04, 0.04, 0.04, 0.5 ])
    """
    values = np.asarray(p, dtype=np.float64)
    if np.isnan(values).any() or (values < 0).any() or (values > 1).any():
        raise ValueError(
            "fdr_q_values takes p values in [0, 1] without NaN; select the voxels of the "
            "mask (finite values) first"
        )
    flat = values.ravel()
    order = np.argsort(flat, kind="stable")
    scaled = flat[order] / (np.arange(1, flat.size + 1) / flat.size)
    q = np.empty_like(flat)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q.reshape(values.shape)


def write_table(
    table: pd.DataFrame, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write a cluster table as a BIDS-style TSV, atomically, marked as bigglm's.

    Tab-separated, a header row, no index, ``n/a`` for missing values (NaN, and the
    empty cluster size of sub-peak rows); full float precision. A JSON sidecar of the
    same stem records that bigglm wrote it (:mod:`bigglm.io.artefacts`).

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`clusters_table`.
    path : path
        Ends in ``.tsv``; its folder must exist.
    overwrite : bool
        Replace a table bigglm wrote there before.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If ``path`` does not end in ``.tsv``.
    StoreError
        If something bigglm did not write is at ``path`` or at its sidecar (never
        replaced), or a table bigglm wrote is there and ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile
    >>> table = pd.DataFrame({"Cluster ID": [1, "1a"], "Peak Stat": [5.0, 4.5],
    ...                       "Cluster Size (mm3)": [216, ""]})
    >>> path = write_table(table, Path(tempfile.mkdtemp()) / "clusters.tsv")
    >>> print(path.read_text(), end="")
    Cluster ID	Peak Stat	Cluster Size (mm3)
    1	5.0	216
    1a	4.5	n/a
    """
    path = Path(path)
    if path.suffix != ".tsv":
        raise ValueError(f"{path}: a cluster table is written as TSV; give a path ending in .tsv")
    blank = table.map(lambda value: isinstance(value, str) and value == "")
    with writing(path, "cluster-table", overwrite=overwrite) as stage:
        table.mask(blank).to_csv(stage, sep="\t", index=False, na_rep="n/a")
    return path
