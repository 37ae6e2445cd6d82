"""Permutation results as NIfTI maps with BIDS-derivatives names.

``<prefix>_contrast-<label>_stat-<stat>_statmap.nii.gz`` (for maps on surfaces, GIFTI
``*_hemi-L_..._statmap.shape.gii`` or CIFTI-2 ``*.dscalar.nii``,
:func:`bigglm.glm.persistence.write_contrast_maps`), the statistics named as
nilearn's ``non_parametric_inference`` outputs (``-log10 p``):

============================  =====================================================
stat                          map
============================  =====================================================
``t``                         the observed t
``logp``                      uncorrected p
``logpmaxt``                  family-wise error, voxel-wise max-T
``tfce``, ``logpmaxtfce``     TFCE values and their FWE p (with ``tfce=True``)
``logpmaxsize``               FWE p of cluster extents (with a cluster threshold)
``logpmaxmass``               FWE p of cluster masses (with a cluster threshold)
============================  =====================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr

from bigglm.exceptions import StoreError

__all__ = ["MAPS", "permutation_table", "write_maps"]

#: Map name -> (result variable, whether it is a p value written as -log10 p).
MAPS = {
    "t": ("t", False),
    "logp": ("p", True),
    "logpmaxt": ("p_fwe", True),
    "tfce": ("tfce", False),
    "logpmaxtfce": ("p_tfce_fwe", True),
    "logpmaxsize": ("p_cluster_extent_fwe", True),
    "logpmaxmass": ("p_cluster_mass_fwe", True),
}


def write_maps(
    result: xr.Dataset,
    directory: str | os.PathLike[str],
    *,
    contrast: str,
    prefix: str = "group",
    overwrite: bool = False,
) -> list[Path]:
    """Write a permutation test's maps (those it computed) as NIfTI files.

    Parameters
    ----------
    result : xarray.Dataset
        From :func:`bigglm.inference.permutation_test` on a group store.
    directory : path-like
        Created if missing.
    contrast : str
        The contrast's name, for the ``contrast-`` entity (``"patientsMinusControls"``).
    prefix : str
        BIDS entities before ``contrast-`` (default ``"group"``).
    overwrite : bool
        Replace maps bigglm wrote; anything else is refused.

    Returns
    -------
    list of pathlib.Path

    Raises
    ------
    StoreError
        If the result has no voxel grid, or a map's path may not be written.

    Examples
    --------
    >>> import tempfile
    >>> grid = np.ones((2, 1, 1), bool)
    >>> result = xr.Dataset(
    ...     {"t": ("voxel", [2.0, 0.5]), "p": ("voxel", [0.01, 0.3]),
    ...      "p_fwe": ("voxel", [0.02, 0.5]), "mask": (("x", "y", "z"), grid)},
    ...     attrs={"affine": np.eye(4).tolist()})
    >>> [p.name for p in write_maps(result, tempfile.mkdtemp(), contrast="mean")]
    ['group_contrast-mean_stat-t_statmap.nii.gz',
     'group_contrast-mean_stat-logp_statmap.nii.gz',
     'group_contrast-mean_stat-logpmaxt_statmap.nii.gz']
    """
    from bigglm.glm.persistence import write_contrast_maps

    like = _grid_of(result)
    present = {stat: name for stat, (name, _) in MAPS.items() if name in result}

    def maps_of(_: object) -> dict[str, xr.DataArray]:
        return {stat: _map(result, stat) for stat in present}

    return write_contrast_maps(
        directory,
        {contrast: contrast},
        maps_of,
        like=like,
        prefix=prefix,
        kind="t",
        overwrite=overwrite,
        stats=list(present),
    )


def _grid_of(result: xr.Dataset) -> xr.Dataset:
    """Where a permutation result's maps go: its voxel grid, or its surface geometry
    (columns of a vertex or grayordinate Dataset: GIFTI or CIFTI-2 maps)."""
    from bigglm.io.geometry import COLUMN_COORDS, GEOMETRY_ATTRS, geometry_of

    if geometry_of(result.attrs) != "voxel":
        coords = {k: result[k] for k in COLUMN_COORDS if k in result.coords}
        attrs = {k: result.attrs[k] for k in GEOMETRY_ATTRS if k in result.attrs}
        return xr.Dataset(coords=coords, attrs=attrs)
    if "mask" not in result or "affine" not in result.attrs:
        raise StoreError(
            "this permutation result has no voxel grid (tested from a Dataset without mask "
            "and affine); test a group store from bigglm.group.collect to write NIfTI maps"
        )
    return xr.Dataset(
        {"mask": result["mask"]}, attrs={"affine": result.attrs["affine"], "tr": None}
    )


def _map(result: xr.Dataset, stat: str) -> xr.DataArray:
    name, is_p = MAPS[stat]
    values = result[name]
    if not is_p:
        return values
    with np.errstate(divide="ignore"):
        return xr.DataArray(-np.log10(values.values), dims=values.dims)


def permutation_table(
    result: xr.Dataset,
    *,
    stat_threshold: float | None = None,
    cluster_p: Literal["extent", "mass"] = "extent",
    min_distance: float = 8.0,
) -> pd.DataFrame:
    """The clusters and peaks of a permutation test's t map, with their p values.

    :func:`bigglm.inference.clusters_table` of the observed t map at the test's
    cluster-forming threshold, with ``P(FWE) cluster`` (from the cluster extent or mass
    null distribution), ``P(FWE) peak`` (max-T) and ``Q(FDR) peak`` (Benjamini–Hochberg
    over the tested voxels, from the uncorrected permutation p values).

    Parameters
    ----------
    result : xarray.Dataset
        From :func:`bigglm.inference.permutation_test` on a group store.
    stat_threshold : float, optional
        The t threshold of the table; default the test's ``cluster_threshold``.
    cluster_p : {"extent", "mass"}
        Which cluster statistic's FWE p fills ``P(FWE) cluster``.
    min_distance : float
        Smallest distance (mm) between a cluster's reported peaks.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    StoreError
        If the result has no voxel grid.
    ValueError
        Without a threshold (neither given nor used by the test).

    Examples
    --------
    >>> grid = np.zeros((6, 6, 6), bool)
    >>> grid[1:5, 1:5, 1:5] = True
    >>> t = np.zeros(grid.sum())
    >>> t[:3] = 4.0
    >>> result = xr.Dataset(
    ...     {"t": ("voxel", t), "p": ("voxel", np.where(t > 0, 0.001, 0.5)),
    ...      "p_fwe": ("voxel", np.where(t > 0, 0.01, 1.0)), "mask": (("x", "y", "z"), grid)},
    ...     attrs={"affine": np.eye(4).tolist(), "two_sided": False})
    >>> permutation_table(result, stat_threshold=3.0)[["Cluster ID", "Peak Stat", "P(FWE) peak"]]
      Cluster ID  Peak Stat  P(FWE) peak
    0          1        4.0         0.01
    """
    from bigglm.inference.tables import clusters_table

    threshold = result.attrs.get("cluster_threshold") if stat_threshold is None else stat_threshold
    if threshold is None:
        raise ValueError(
            "the test used no cluster-forming threshold; give stat_threshold= (a t value)"
        )
    images = {name: _image(result, name) for name in ("t", "p", "p_fwe") if name in result}
    cluster = f"p_cluster_{cluster_p}_fwe"
    return clusters_table(
        images["t"],
        float(threshold),
        two_sided=bool(result.attrs.get("two_sided", False)),
        min_distance=min_distance,
        p_cluster_fwe=_image(result, cluster) if cluster in result else None,
        p_peak_fwe=images.get("p_fwe"),
        p_peak_uncorrected=images.get("p"),
        mask_img=_image(result, "mask"),
    )


def _image(result: xr.Dataset, name: str) -> nib.Nifti1Image:
    """A result variable as an in-memory NIfTI on the store's grid (NaN outside)."""
    if "mask" not in result or "affine" not in result.attrs:
        raise StoreError(
            "this permutation result has no voxel grid; test a group store from "
            "bigglm.group.collect"
        )
    mask = np.asarray(result["mask"].values, dtype=bool)
    if name == "mask":
        return nib.Nifti1Image(mask.astype(np.uint8), np.asarray(result.attrs["affine"]))
    volume = np.full(mask.shape, np.nan)
    volume[mask] = result[name].values  # the store's voxels are the mask's, in C order
    if name == "t":
        volume = np.nan_to_num(volume, nan=0.0)
    return nib.Nifti1Image(volume, np.asarray(result.attrs["affine"]))
