"""Permutation results as NIfTI maps with BIDS-derivatives names.

``<prefix>_contrast-<label>_stat-<stat>_statmap.nii.gz``, the statistics named as
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

import numpy as np
import xarray as xr

from bigglm.exceptions import StoreError

__all__ = ["MAPS", "write_maps"]

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

    if "mask" not in result or "affine" not in result.attrs:
        raise StoreError(
            "this permutation result has no voxel grid (tested from a Dataset without mask "
            "and affine); test a group store from bigglm.group.collect to write NIfTI maps"
        )
    like = xr.Dataset(
        {"mask": result["mask"]}, attrs={"affine": result.attrs["affine"], "tr": None}
    )
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


def _map(result: xr.Dataset, stat: str) -> xr.DataArray:
    name, is_p = MAPS[stat]
    values = result[name]
    if not is_p:
        return values
    with np.errstate(divide="ignore"):
        return xr.DataArray(-np.log10(values.values), dims=values.dims)
