"""The geometries of a store's columns: their names, arrays and attributes.

The vocabulary :mod:`bigglm.io.store` documents (a volume's voxels, a surface's
vertices, CIFTI-2 grayordinates), in a module of its own that imports nothing heavy, so
that the engine and the inference code can name it without loading Zarr.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["COLUMN_COORDS", "GEOMETRY_ARRAYS", "GEOMETRY_ATTRS", "HEMISPHERES", "geometry_of"]

#: The per-column arrays of each geometry (:mod:`bigglm.io.store` has their layout).
GEOMETRY_ARRAYS: dict[str, tuple[str, ...]] = {
    "voxel": ("mask", "i", "j", "k"),
    "vertex": ("hemisphere", "vertex"),
    "grayordinate": ("structure", "vertex", "ijk"),
}

#: Hemispheres of a ``vertex`` store, by their code in its ``hemisphere`` array.
HEMISPHERES = ("L", "R")

#: Coordinates that say what each column of ``bold`` is (a voxel, a vertex, a
#: grayordinate): what results carry over from a store, and what runs fitted together
#: must share.
COLUMN_COORDS = ("voxel", "i", "j", "k", "hemisphere", "vertex", "structure", "ijk")

#: Attributes that describe a surface geometry (a volume's are ``affine``, ``volume_shape``).
GEOMETRY_ATTRS = ("geometry", "hemispheres", "cifti")


def geometry_of(meta: Mapping[str, Any]) -> str:
    """The geometry recorded in a store's (or a Dataset's) attributes: ``"voxel"`` if none.

    Examples
    --------
    >>> geometry_of({}), geometry_of({"geometry": "vertex"})
    ('voxel', 'vertex')
    """
    return str(meta.get("geometry", "voxel"))
