"""Spatial inference on cortical surfaces: the mesh graph of a store's columns, cluster tables.

A store of geometry ``"vertex"`` (GIFTI) or ``"grayordinate"`` (CIFTI-2) holds, per
column, a vertex of a hemisphere's mesh (or, for CIFTI, a voxel): :func:`mesh_adjacency`
builds the graph the cluster and TFCE kernels of :mod:`bigglm.inference.spatial` take,
from the triangles of the meshes the series were sampled on. Vertices the store left out
(the medial wall) are dropped with their edges; the hemispheres are not connected to
each other (the graph is block diagonal); CIFTI voxels are joined by the voxel grid
(``connectivity``) and not to any vertex.

:func:`surface_clusters_table` lists the clusters of one map with their hemisphere,
vertex count and peak.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from numpy.typing import ArrayLike

from bigglm.exceptions import StoreError
from bigglm.inference.spatial import Graph, join_graphs, label, mesh_graph, voxel_graph
from bigglm.io.geometry import HEMISPHERES, geometry_of
from bigglm.io.store import open_run
from bigglm.typing import Connectivity

__all__ = ["mesh_adjacency", "surface_clusters_table"]

#: CIFTI-2 structure of each hemisphere's cortex.
CORTEX = {"L": "CIFTI_STRUCTURE_CORTEX_LEFT", "R": "CIFTI_STRUCTURE_CORTEX_RIGHT"}

MeshLike = str | os.PathLike[str] | tuple[ArrayLike, ArrayLike] | Any


def mesh_adjacency(
    like: str | os.PathLike[str] | xr.Dataset,
    meshes: Mapping[str, MeshLike],
    *,
    connectivity: Connectivity = 6,
) -> Graph:
    """The neighbourhood graph of a surface store's columns, from its meshes' triangles.

    Parameters
    ----------
    like : path or xarray.Dataset
        A store of geometry ``"vertex"`` or ``"grayordinate"`` (or its Dataset, or any
        Dataset with its ``hemisphere``/``vertex`` coordinates and attributes: a group
        Dataset on the same vertices).
    meshes : mapping
        The mesh of each hemisphere, ``{"L": ..., "R": ...}`` (for CIFTI also keyed by
        structure name): a GIFTI mesh file (``*.surf.gii``), an object with
        ``coordinates`` and ``faces`` (nilearn's meshes), or a ``(coordinates, faces)``
        pair. Any surface of the subject's or template's mesh will do (white, pial,
        midthickness, inflated: they share triangles).
    connectivity : {6, 18, 26}
        For CIFTI's voxels: their neighbourhood on the voxel grid.

    Returns
    -------
    Graph
        Node ``c`` is column ``c`` of the store.

    Raises
    ------
    StoreError
        A volume store, a hemisphere without a mesh, a mesh with another vertex count
        than the store's hemisphere, or an unreadable mesh file.

    Examples
    --------
    >>> ds = xr.Dataset(coords={"hemisphere": ("voxel", np.int8([0, 0, 1])),
    ...                         "vertex": ("voxel", np.int32([0, 2, 1]))},
    ...                 attrs={"geometry": "vertex", "hemispheres": {"L": 3, "R": 3}})
    >>> square = (np.zeros((3, 3)), [[0, 1, 2]])
    >>> mesh_adjacency(ds, {"L": square, "R": square})
    Graph(n=3, n_edges=1)
    """
    ds = like if isinstance(like, xr.Dataset) else open_run(like)
    geometry = geometry_of(ds.attrs)
    vertex = np.asarray(ds["vertex"].values) if "vertex" in ds.coords else None
    if geometry not in ("vertex", "grayordinate") or vertex is None:
        raise StoreError(
            f"{ds.attrs.get('store', 'the maps')}: holds {geometry} columns, not vertices of "
            "a mesh; for a volume use bigglm.inference.spatial.voxel_graph"
        )
    parts = []
    for key, columns, n_vertices in _surfaces(ds):
        faces = _faces(meshes, key, n_vertices)
        mapping = np.full(n_vertices, -1, dtype=np.int64)
        mapping[vertex[columns]] = columns
        parts.append((mesh_graph(faces, n_vertices), mapping))
    if geometry == "grayordinate":
        voxels = np.flatnonzero(vertex < 0)
        ijk = np.asarray(ds["ijk"].values)[voxels]
        parts.append((voxel_graph(ijk, connectivity=connectivity), voxels))
    return join_graphs(parts, ds.sizes["voxel"])


def _surfaces(ds: xr.Dataset) -> list[tuple[str, np.ndarray, int]]:
    """Per surface of the store: its name, its columns, its mesh's vertex count."""
    if geometry_of(ds.attrs) == "vertex":
        codes = np.asarray(ds["hemisphere"].values)
        return [
            (hemi, np.flatnonzero(codes == HEMISPHERES.index(hemi)), int(n))
            for hemi, n in ds.attrs["hemispheres"].items()
        ]
    cifti = ds.attrs["cifti"]
    structure = np.asarray(ds["structure"].values)
    return [
        (name, np.flatnonzero(structure == cifti["structures"].index(name)), int(n))
        for name, n in cifti["nvertices"].items()
    ]


def _faces(meshes: Mapping[str, MeshLike], key: str, n_vertices: int) -> np.ndarray:
    """The triangles of the mesh given for surface ``key``, checked against its size."""
    hemi = {v: k for k, v in CORTEX.items()}.get(key, key)
    mesh = meshes.get(key, meshes.get(hemi))
    if mesh is None:
        raise StoreError(
            f"no mesh for {key} (meshes given for {sorted(meshes)}); give the mesh of every "
            "hemisphere of the maps, e.g. {'L': 'lh.surf.gii', 'R': 'rh.surf.gii'}"
        )
    name, coordinates, faces = _mesh_arrays(mesh)
    if len(coordinates) != n_vertices:
        raise StoreError(
            f"{name}: the mesh has {len(coordinates)} vertices but the maps' {key} has "
            f"{n_vertices}; give the mesh the series was sampled on (fsaverage5 for "
            "space-fsaverage5, the 32k fsLR mesh for den-91k CIFTI)"
        )
    return faces


def _mesh_arrays(mesh: MeshLike) -> tuple[str, np.ndarray, np.ndarray]:
    if isinstance(mesh, str | os.PathLike):
        from bigglm.io.gifti import read_mesh

        return (str(mesh), *read_mesh(Path(mesh)))
    if hasattr(mesh, "coordinates") and hasattr(mesh, "faces"):
        polygon: Any = mesh
        return "the mesh", np.asarray(polygon.coordinates), np.asarray(polygon.faces)
    coordinates, faces = mesh
    return "the mesh", np.asarray(coordinates), np.asarray(faces)


def surface_clusters_table(
    stat: ArrayLike,
    like: str | os.PathLike[str] | xr.Dataset,
    graph: Graph,
    threshold: float,
    *,
    two_sided: bool = False,
) -> pd.DataFrame:
    """The clusters of one surface map: hemisphere, vertex count, mass and peak.

    Clusters are connected components of ``stat > threshold`` on ``graph`` (and of
    ``stat < -threshold`` with ``two_sided``), as :func:`bigglm.inference.spatial.label`.

    Parameters
    ----------
    stat : array_like, shape (V,)
        One value per column of the store.
    like : path or xarray.Dataset
        The store (or Dataset) whose columns ``stat`` follows.
    graph : Graph
        :func:`mesh_adjacency` of the same store.
    threshold : float
    two_sided : bool

    Returns
    -------
    pandas.DataFrame
        One row per cluster, by decreasing size: ``Cluster ID`` (1..K, as the labels),
        ``Hemisphere`` (``L``/``R``; for CIFTI the structure of the peak), ``Vertices``
        (nodes in the cluster: vertices, or voxels of a CIFTI volume structure),
        ``Mass`` (``sum(|stat| - threshold)``), ``Peak Stat`` and ``Peak Vertex`` (the
        vertex on its hemisphere's mesh, -1 for a voxel).

    Examples
    --------
    >>> ds = xr.Dataset(coords={"hemisphere": ("voxel", np.int8([0, 0, 1])),
    ...                         "vertex": ("voxel", np.int32([0, 1, 0]))},
    ...                 attrs={"geometry": "vertex", "hemispheres": {"L": 2, "R": 1}})
    >>> g = mesh_adjacency(ds, {"L": (np.zeros((2, 3)), [[0, 1, 1]]),
    ...                         "R": (np.zeros((1, 3)), np.zeros((0, 3), int))})
    >>> surface_clusters_table([3.0, 4.0, 5.0], ds, g, 2.0)[["Hemisphere", "Vertices"]]
      Hemisphere  Vertices
    0          L         2
    1          R         1
    """
    ds = like if isinstance(like, xr.Dataset) else open_run(like)
    values = np.asarray(stat, dtype=np.float64)
    labels, extents, masses = label(values, graph, threshold, two_sided=two_sided)
    where = _column_names(ds)
    vertex = np.asarray(ds["vertex"].values)
    rows = []
    for k in range(1, len(extents) + 1):
        members = np.flatnonzero(labels == k)
        peak = members[np.argmax(np.abs(values[members]))]
        rows.append(
            {
                "Cluster ID": k,
                "Hemisphere": where[peak],
                "Vertices": int(extents[k - 1]),
                "Mass": float(masses[k - 1]),
                "Peak Stat": float(values[peak]),
                "Peak Vertex": int(vertex[peak]),
            }
        )
    columns = ["Cluster ID", "Hemisphere", "Vertices", "Mass", "Peak Stat", "Peak Vertex"]
    return pd.DataFrame(rows, columns=columns)


def _column_names(ds: xr.Dataset) -> np.ndarray:
    """Per column, its hemisphere (``L``/``R``) or, for CIFTI, its structure."""
    if geometry_of(ds.attrs) == "vertex":
        return np.asarray(HEMISPHERES)[np.asarray(ds["hemisphere"].values)]
    names = {v: k for k, v in CORTEX.items()}
    structures = [names.get(s, s) for s in ds.attrs["cifti"]["structures"]]
    return np.asarray(structures, dtype=object)[np.asarray(ds["structure"].values)]
