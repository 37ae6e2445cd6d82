"""Cluster and TFCE statistics on a graph of in-mask voxels (or mesh vertices).

Maps are vectors over the graph's nodes: the in-mask voxels in a store's voxel order, one
row per map in a batch ``(B, V)``. The spatial structure is a :class:`Graph` (CSR
adjacency), built from voxel indices by :func:`voxel_graph` or from a triangle mesh by
:func:`mesh_graph`, so the same code serves volumes and cortical surfaces. The kernels are
compiled with numba (``nogil``, so Dask threads run them in parallel) and loop over the
maps of a batch themselves; each map takes one pass over its voxels and edges.

Conventions
-----------
**TFCE** (:func:`tfce`, default, stepped) follows ``fslmaths -tfce`` as nilearn's
``calculate_tfce`` implements it (``nilearn/mass_univariate/_utils.py``; the tests compare
with nilearn 0.12 and 0.14):

* ``n_steps`` heights ``h_k = k * h_max / n_steps``, ``k = 1..n_steps``
  (``np.linspace(0, h_max, n_steps + 1)[1:]``), where ``h_max`` is the map's largest value,
  or its largest absolute value when ``two_sided``. The first height is ``h_max / n_steps``,
  not 0; the last is ``h_max``. A map with no positive value (one-sided) scores 0.
* At each height the clusters are the connected components of the voxels with
  ``value >= h_k`` (not strictly greater).
* ``TFCE(v) = sum over k with h_k <= value(v) of extent_k(v) ** E * h_k ** H``, with no
  ``dh`` factor (Smith & Nichols 2009 multiply by ``dh``; fslmaths and nilearn do not).
* ``two_sided``: the negative tail is the TFCE of ``-map`` on the same heights (from
  ``max |map|``), returned negative, as nilearn's ``two_sided_test=True``. One-sided
  scoring ignores negative values.

All voxels of a map are scored in one sweep, not one labelling per step: voxels enter in
decreasing order of their step (the step of voxel ``v`` is the number of heights ``<=
value(v)``), joined to their neighbours by a union-find (union by size, path halving). A
cluster over the steps during which it does not change is a node of a merge tree; when it
grows or merges at a lower step, its node closes with the contribution ``extent ** E *
(Q[start] - Q[end])``, where ``Q[k] = sum_{j <= k} h_j ** H``, under the node of the
cluster it became. A voxel's TFCE is the sum of the contributions along the tree's path
from the cluster it joined at its own step to the root, added up once per map at the end.
Every term of that sum is non-negative (no offsets that cancel).

``exact=True`` integrates instead of summing steps: ``TFCE(v) = ∫_0^value(v) e_v(h) ** E
h ** H dh``, where ``e_v(h)`` is the extent of the component of ``{value >= h}`` holding
``v``. ``e_v`` is constant between consecutive distinct values ``u_1 > u_2 > ... > 0`` of
the map, so the integral is ``sum_i e_i ** E (u_i ** (H+1) - u_{i+1} ** (H+1)) / (H+1)``
(``u_{last+1} = 0``), the same sweep with ``Q`` replaced by ``u ** (H+1) / (H+1)``. As the
stepped sum has no ``dh``, it is about ``n_steps / h_max`` times the integral.

**Clusters** (:func:`clusters`, :func:`label`) follow nilearn's ``permuted_ols``
(``calculate_cluster_measures``): a cluster is a connected component of the voxels with
``value > threshold`` (strictly greater); with ``two_sided``, positive (``value >
threshold``) and negative (``value < -threshold``) voxels form separate components, which
compete for the maxima. Extent is the number of voxels; mass is ``sum(|value| -
threshold)`` over the cluster's voxels (the mass above the threshold). FSL randomise's user
guide ("Mass is the sum of all statistic values within the cluster") and PALM
(``palm_clusterm.m``: the sum of the statistic over the voxels ``>= thr``) use the plain sum
of the statistic instead, which is this mass plus ``threshold * extent`` per cluster.

**Parameters for volumes and surfaces.** ``tfce`` defaults to ``E=0.5, H=2``, FSL's 3-D
defaults (``fslmaths -tfce 2 0.5 6``, randomise ``-T``: H=2, E=0.5, 6-connectivity) and
nilearn's. On a surface mesh use :data:`SURFACE_TFCE` (``H=2, E=1``), FSL's and PALM's
2-D defaults (randomise ``--T2``, PALM ``-T -tfce2D``): a cluster on a sheet grows as the
square of its radius rather than its cube, so extent is weighted more. Extent is the
number of vertices by default; ``tfce(..., weights=vertex_areas(coordinates, faces))``
makes it the cluster's area instead. Build the graph of a mesh with
:func:`mesh_graph`, restrict it to a store's vertices and join the hemispheres with
:func:`join_graphs` (:func:`bigglm.inference.meshes.mesh_adjacency` does both from a
store), or convert any sparse adjacency with :func:`sparse_graph`.

NaN values are never part of a cluster (they split clusters, as voxels outside the mask
would); their TFCE is NaN. Infinite values are an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from bigglm.typing import Connectivity

__all__ = [
    "SURFACE_TFCE",
    "Graph",
    "clusters",
    "join_graphs",
    "label",
    "mesh_graph",
    "sparse_graph",
    "tfce",
    "vertex_areas",
    "voxel_graph",
]

logger = logging.getLogger(__name__)

_Maps = NDArray[np.float32] | NDArray[np.float64]  # maps (rows) as the kernels take them
_Reals = NDArray[np.float64]
_Ints = NDArray[np.int64]
_Nodes = NDArray[np.int32]
#: The merge tree's nodes: start key, score, parent node; and the closing order.
_Tree = tuple[_Reals, _Reals, _Nodes, _Nodes]

#: TFCE exponents on surface meshes: FSL ``--T2`` and PALM ``-tfce2D`` (H=2, E=1).
SURFACE_TFCE = {"E": 1.0, "H": 2.0}

#: The taxicab radius of each voxel neighbourhood (scipy's ``generate_binary_structure``).
_RANK = {6: 1, 18: 2, 26: 3}
#: Bounding boxes up to this many cells (or 8 per voxel) get a dense look-up volume.
_DENSE_CELLS = 1 << 22


# --- graphs ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Graph:
    """An undirected graph in CSR form: the neighbours of node ``i`` are
    ``indices[indptr[i]:indptr[i + 1]]``.

    The kernels need it symmetric (``j`` lists ``i`` when ``i`` lists ``j``) and without
    self loops, which is not checked; :func:`voxel_graph` and :func:`mesh_graph` build it so,
    with each neighbour list sorted. The arrays are read-only.

    Parameters
    ----------
    indptr : ndarray of int64, shape (n + 1,)
        Row offsets into ``indices``.
    indices : ndarray of int32, shape (indptr[-1],)
        Neighbour indices.
    n : int
        Number of nodes (voxels or vertices).

    Examples
    --------
    >>> g = Graph(np.array([0, 1, 2]), np.array([1, 0]), 2)
    >>> g, g.indices.dtype, g.n_edges
    (Graph(n=2, n_edges=1), dtype('int32'), 1)
    """

    indptr: NDArray[np.int64]
    indices: NDArray[np.int32]
    n: int

    def __post_init__(self) -> None:
        indptr = np.array(self.indptr, dtype=np.int64)
        indices = np.array(self.indices, dtype=np.int32)
        n = int(self.n)
        if n < 0 or indptr.shape != (n + 1,) or indptr[0] != 0 or indptr[-1] != indices.size:
            raise ValueError(
                f"indptr has shape {indptr.shape} for n={n} nodes and {indices.size} indices; "
                f"expected n + 1 offsets from 0 to {indices.size}"
            )
        if indices.size and (np.min(indices) < 0 or np.max(indices) >= n):
            raise ValueError(
                f"indices run from {np.min(indices)} to {np.max(indices)}; expected 0..{n - 1}"
            )
        for name, array in (("indptr", indptr), ("indices", indices)):
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        object.__setattr__(self, "n", n)

    @property
    def n_edges(self) -> int:
        """Number of (undirected) edges."""
        return int(self.indices.size // 2)

    def __repr__(self) -> str:
        return f"Graph(n={self.n}, n_edges={self.n_edges})"


def voxel_graph(ijk: ArrayLike, *, connectivity: Connectivity = 6) -> Graph:
    """The neighbourhood graph of voxels given by their indices.

    Parameters
    ----------
    ijk : array_like of int, shape (V, 3)
        Voxel indices, one row per node, in the order of the maps' voxels (for example
        ``np.argwhere(mask)``, the C order of ``np.nonzero(mask)``). No row may repeat.
    connectivity : {6, 18, 26}
        Voxels sharing a face (6), a face or an edge (18), or a face, edge or corner (26),
        as ``scipy.ndimage.generate_binary_structure(3, 1 | 2 | 3)``.

    Returns
    -------
    Graph
        Node ``i`` is voxel ``ijk[i]``.

    Raises
    ------
    ValueError
        If ``ijk`` is not ``(V, 3)``, repeats a voxel, or ``connectivity`` is not 6, 18, 26.
    TypeError
        If ``ijk`` is not integer.

    Examples
    --------
    >>> g = voxel_graph([[0, 0, 0], [0, 0, 1], [0, 1, 1], [5, 5, 5]])
    >>> g
    Graph(n=4, n_edges=2)
    >>> [g.indices[g.indptr[i] : g.indptr[i + 1]].tolist() for i in range(g.n)]
    [[1], [0, 2], [1], []]
    >>> voxel_graph([[0, 0, 0], [1, 1, 1]], connectivity=26).n_edges
    1
    """
    if connectivity not in _RANK:
        raise ValueError(f"connectivity={connectivity!r}; expected 6, 18 or 26")
    points = _voxel_indices(ijk)
    low = points.min(axis=0) if len(points) else np.zeros(3, dtype=np.int64)
    local = points - low + 1  # the neighbours of every voxel stay inside the box
    shape = [int(s) + 2 for s in local.max(axis=0, initial=0)]
    if shape[0] * shape[1] * shape[2] >= 1 << 62:
        raise ValueError(f"ijk spans a box of {shape} voxels; expected one under 2**62")
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    linear = local @ strides
    steps = _offsets(connectivity) @ strides
    neighbours = _locate(linear, linear[:, None] + steps, shape[0] * shape[1] * shape[2])
    neighbours.sort(axis=1)  # -1 (no neighbour) first, then ascending
    present = neighbours >= 0
    indptr = np.concatenate([[0], np.cumsum(present.sum(axis=1))])
    graph = Graph(indptr, neighbours[present], len(points))
    logger.debug(
        "voxel graph: %d voxels, %d edges (%d-connected)", graph.n, graph.n_edges, connectivity
    )
    return graph


def mesh_graph(faces: ArrayLike, n_vertices: int) -> Graph:
    """The edge graph of a triangle mesh: vertices are nodes, triangle sides are edges.

    Parameters
    ----------
    faces : array_like of int, shape (F, 3)
        Vertex indices of each triangle. Repeated vertices in a face add no self loop.
    n_vertices : int
        Number of vertices (nodes); vertices in no face have no neighbour.

    Returns
    -------
    Graph

    Raises
    ------
    ValueError
        If ``faces`` is not ``(F, 3)`` or names a vertex outside ``0..n_vertices - 1``.
    TypeError
        If ``faces`` is not integer.

    Examples
    --------
    >>> g = mesh_graph([[0, 1, 2], [2, 1, 3]], 5)
    >>> g
    Graph(n=5, n_edges=5)
    >>> g.indices[g.indptr[1] : g.indptr[2]].tolist()
    [0, 2, 3]
    """
    tri = _integers(faces, "faces")
    if tri.ndim != 2 or tri.shape[1] != 3:
        raise ValueError(f"faces has shape {tri.shape}; expected (F, 3) vertex indices")
    n = int(n_vertices)
    if tri.size and (np.min(tri) < 0 or np.max(tri) >= n):
        raise ValueError(
            f"faces name vertices {np.min(tri)}..{np.max(tri)}; expected 0..{n - 1} "
            f"for n_vertices={n}"
        )
    a, b, c = tri.T
    return _from_edges(np.concatenate([a, b, c]), np.concatenate([b, c, a]), n)


def _from_edges(rows: NDArray[np.int64], cols: NDArray[np.int64], n: int) -> Graph:
    """The graph of the undirected edges ``rows[e] -- cols[e]`` (repeats and self loops
    dropped), each neighbour list sorted."""
    rows, cols = np.concatenate([rows, cols]), np.concatenate([cols, rows])
    keys = np.unique(rows[rows != cols] * n + cols[rows != cols])
    indptr = np.concatenate([[0], np.cumsum(np.bincount(keys // max(n, 1), minlength=n))])
    return Graph(indptr, keys % max(n, 1), n)


def join_graphs(parts: Sequence[tuple[Graph, ArrayLike]], n: int) -> Graph:
    """One graph over ``n`` nodes from graphs whose nodes are mapped onto them.

    Each part is a graph and, per node of it, the node it becomes (``0..n-1``), or -1
    to drop it with its edges: so a mesh's graph restricted to the vertices a store
    kept (the medial wall dropped), and the hemispheres' graphs side by side (block
    diagonal, no edge between parts), are one call.

    Parameters
    ----------
    parts : sequence of (Graph, array_like of int)
    n : int
        Nodes of the joined graph.

    Returns
    -------
    Graph

    Raises
    ------
    ValueError
        If a mapping does not have one entry per node of its graph, or names a node
        outside ``-1..n-1``.

    Examples
    --------
    Two triangles (0, 1, 2) as two hemispheres; vertex 1 of the first is dropped:

    >>> tri = mesh_graph([[0, 1, 2]], 3)
    >>> g = join_graphs([(tri, [0, -1, 1]), (tri, [2, 3, 4])], 5)
    >>> g, [g.indices[g.indptr[i] : g.indptr[i + 1]].tolist() for i in range(g.n)]
    (Graph(n=5, n_edges=4), [[1], [0], [3, 4], [2, 4], [2, 3]])
    """
    n = int(n)
    rows, cols = [], []
    for graph, mapping in parts:
        target = _integers(mapping, "mapping")
        low, high = (np.min(target), np.max(target)) if target.size else (0, 0)
        if target.shape != (graph.n,) or (target.size and (low < -1 or high >= n)):
            raise ValueError(
                f"a mapping of shape {target.shape} with values {low}..{high} for a graph "
                f"of {graph.n} nodes; expected one node in -1..{n - 1} per node"
            )
        source = np.repeat(np.arange(graph.n), np.diff(graph.indptr))
        a, b = target[source], target[graph.indices]
        kept = (a >= 0) & (b >= 0)
        rows.append(a[kept])
        cols.append(b[kept])
    empty = np.zeros(0, dtype=np.int64)
    return _from_edges(np.concatenate([empty, *rows]), np.concatenate([empty, *cols]), n)


def sparse_graph(adjacency: Any) -> Graph:
    """A :class:`Graph` from a square scipy.sparse (or dense) adjacency matrix.

    Any non-zero entry ``(i, j)`` is an edge; the matrix is made symmetric and its
    diagonal ignored, so an upper-triangular matrix serves as well.

    Examples
    --------
    >>> import scipy.sparse
    >>> sparse_graph(scipy.sparse.coo_array(([1, 1], ([0, 1], [1, 2])), shape=(4, 4)))
    Graph(n=4, n_edges=2)
    """
    import scipy.sparse

    matrix = scipy.sparse.coo_array(adjacency)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"adjacency has shape {matrix.shape}; expected a square matrix")
    nonzero = matrix.data != 0
    rows = matrix.row[nonzero].astype(np.int64)
    cols = matrix.col[nonzero].astype(np.int64)
    return _from_edges(rows, cols, matrix.shape[0])


def _integers(values: ArrayLike, name: str) -> NDArray[np.int64]:
    array = np.asarray(values)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} has dtype {array.dtype}; expected integer indices")
    return array.astype(np.int64)


def _voxel_indices(ijk: ArrayLike) -> NDArray[np.int64]:
    points = _integers(ijk, "ijk")
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"ijk has shape {points.shape}; expected (V, 3) voxel indices")
    if len(points) >= 1 << 31:
        raise ValueError(f"ijk has {len(points)} voxels; expected under 2**31")
    return points


def _offsets(connectivity: int) -> NDArray[np.int64]:
    """The neighbour offsets of a voxel, in C order of the 3 x 3 x 3 cube."""
    cube = np.indices((3, 3, 3)).reshape(3, -1).T - 1
    taxicab = np.abs(cube).sum(axis=1)
    return cube[(taxicab > 0) & (taxicab <= _RANK[connectivity])]


def _locate(linear: NDArray[np.int64], targets: NDArray[np.int64], cells: int) -> NDArray:
    """The node at each linear index of ``targets`` (-1 where none), as int32.

    A dense look-up volume when the bounding box is small, a binary search otherwise.
    """
    nodes = np.arange(len(linear), dtype=np.int32)
    if cells <= max(_DENSE_CELLS, 8 * len(linear)):
        table = np.full(cells, -1, dtype=np.int32)
        table[linear] = nodes
        if not np.array_equal(table[linear], nodes):
            raise ValueError("ijk repeats a voxel; give each in-mask voxel once")
        return table[targets]
    order = np.argsort(linear, kind="stable")
    known = linear[order]
    if np.any(known[1:] == known[:-1]):
        raise ValueError("ijk repeats a voxel; give each in-mask voxel once")
    at = np.minimum(np.searchsorted(known, targets), len(known) - 1)
    return np.where(known[at] == targets, order[at], -1).astype(np.int32)


# --- map checks ------------------------------------------------------------------------


def _batch(maps: ArrayLike, graph: Graph) -> NDArray[np.floating]:
    """``maps`` as a C-contiguous (B, V) float32 or float64 array, checked against ``graph``."""
    array = np.asarray(maps)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"maps have dtype {array.dtype}; expected real numbers")
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if array.ndim not in (1, 2) or array.shape[-1] != graph.n:
        raise ValueError(
            f"maps have shape {array.shape}; expected ({graph.n},) or (B, {graph.n}), "
            f"one value per node of the graph"
        )
    if np.isinf(array).any():
        raise ValueError("maps contain infinite values; expected finite values (or NaN)")
    return np.ascontiguousarray(array.reshape(-1, graph.n))


def _threshold(threshold: float) -> float:
    value = float(threshold)
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"threshold={threshold!r}; expected a finite value >= 0")
    return value


def _step_heights(batch: NDArray[np.floating], n_steps: int, two_sided: bool) -> NDArray:
    """Per map, the TFCE heights ``h_max * k / n_steps`` (k = 1..n_steps), as nilearn.

    A map with nothing above 0 gets infinite heights, so that no voxel enters.
    """
    top = cast(Any, np.fmax).reduce(batch, axis=1, initial=-np.inf)
    if two_sided:
        top = np.fmax(top, -cast(Any, np.fmin).reduce(batch, axis=1, initial=np.inf))
    heights = np.full((len(batch), n_steps), np.inf)
    for b in np.flatnonzero(top > 0):
        heights[b] = np.linspace(0.0, float(top[b]), n_steps + 1)[1:]
    return heights


# --- TFCE ------------------------------------------------------------------------------


def tfce(
    maps: ArrayLike,
    graph: Graph,
    *,
    E: float = 0.5,
    H: float = 2.0,
    n_steps: int = 100,
    two_sided: bool = False,
    exact: bool = False,
    weights: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Threshold-free cluster enhancement of maps on a graph (fslmaths/nilearn convention).

    Parameters
    ----------
    maps : array_like, shape (V,) or (B, V)
        Statistic maps, one value per node of ``graph``.
    graph : Graph
        Neighbourhoods of the nodes (:func:`voxel_graph`, :func:`mesh_graph`).
    E, H : float
        Extent and height exponents (>= 0).
    n_steps : int
        Number of heights, from ``h_max / n_steps`` to ``h_max`` (see the module notes).
    two_sided : bool
        Also score the negative tail, returned negative.
    exact : bool
        The integral over heights instead of the sum over ``n_steps`` steps (a different
        scale; see the module notes). ``n_steps`` is then unused.
    weights : array_like, shape (V,), optional
        What each node adds to a cluster's extent (default 1: extent is a node count).
        On a mesh, the vertex areas (:func:`vertex_areas`) make extent a cluster's area,
        as PALM does for surfaces with its area correction.

    Returns
    -------
    ndarray of float64, the shape of ``maps``

    Raises
    ------
    ValueError
        If the maps do not match the graph, hold infinite values, or an option is out of
        range.

    Examples
    --------
    A chain of four voxels; two steps, at heights 1 and 2:

    >>> chain = voxel_graph([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]])
    >>> tfce([2.0, 1.0, 0.0, 2.0], chain, n_steps=2)
    array([5.41421356, 1.41421356, 0.        , 5.        ])
    >>> tfce([[2.0, 1.0, -2.0, 0.0]], chain, n_steps=2, two_sided=True)
    array([[ 5.41421356,  1.41421356, -5.        ,  0.        ]])
    >>> tfce([2.0, 1.0, 0.0, 2.0], chain, H=0.0, exact=True)
    array([2.41421356, 1.41421356, 0.        , 2.        ])
    """
    if not (np.isfinite(E) and E >= 0 and np.isfinite(H) and H >= 0):
        raise ValueError(f"E={E!r}, H={H!r}; expected finite exponents >= 0")
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r}; expected a whole number >= 1")
    batch = _batch(maps, graph)
    heights = np.empty((len(batch), 0)) if exact else _step_heights(batch, int(n_steps), two_sided)
    out = _tfce_maps(
        batch,
        heights,
        bool(two_sided),
        bool(exact),
        float(E),
        float(H),
        graph.indptr,
        graph.indices,
        _node_weights(weights, graph),
    )
    return np.asarray(out).reshape(np.shape(maps))


def _node_weights(weights: ArrayLike | None, graph: Graph) -> _Reals:
    """Per node, what it adds to a cluster's extent: finite and >= 0, 1 by default."""
    if weights is None:
        return np.ones(graph.n)
    values = np.asarray(weights, dtype=np.float64)
    if values.shape != (graph.n,) or not (np.isfinite(values).all() and (values >= 0).all()):
        raise ValueError(
            f"weights have shape {values.shape}; expected ({graph.n},) finite values >= 0, "
            "one per node (vertex areas, for example)"
        )
    return values


def vertex_areas(coordinates: ArrayLike, faces: ArrayLike) -> NDArray[np.float64]:
    """Each vertex's share of the mesh's area: a third of each triangle it is part of.

    The vertex-wise area PALM (``palm_calcarea``) and FreeSurfer use; their sum is the
    mesh's area. For :func:`tfce`'s ``weights``.

    Examples
    --------
    >>> vertex_areas([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], [[0, 1, 2], [1, 3, 2]])
    array([0.16666667, 0.33333333, 0.33333333, 0.16666667])
    """
    points = np.asarray(coordinates, dtype=np.float64)
    tri = _integers(faces, "faces")
    a, b, c = (points[tri[:, k]] for k in range(3))
    third = np.linalg.norm(np.cross(b - a, c - a), axis=1) / 6.0
    areas = np.bincount(tri.ravel(), weights=np.repeat(third, 3), minlength=len(points))
    return areas.astype(np.float64)


@numba.njit(cache=True, nogil=True)
def _tfce_maps(
    maps: _Maps,
    heights: _Reals,
    two_sided: bool,
    exact: bool,
    E: float,
    H: float,
    indptr: _Ints,
    indices: _Nodes,
    weights: _Reals,
) -> _Reals:
    """TFCE of each row of ``maps``; the workspace is allocated once for the batch."""
    n_maps, n = maps.shape
    out = np.zeros((n_maps, n))
    order = np.empty(n, np.int32)
    key = np.empty(n)
    sets = (np.full(n, -1, np.int32), np.empty(n, np.int32), np.empty(n, np.int32))
    leaf = np.empty(n, np.int32)
    extent = np.empty(n)
    tree = (np.empty(n), np.empty(n), np.empty(n, np.int32), np.empty(n, np.int32))
    for b in range(n_maps):
        for tail in range(2 if two_sided else 1):
            sign = 1.0 - 2.0 * tail
            if exact:
                m = _by_value(maps[b], sign, H, order, key)
            else:
                m = _by_step(maps[b], sign, heights[b], H, order, key)
            _merge_tree(order[:m], key, E, indptr, indices, sets, weights, extent, leaf, tree)
            scores = tree[1]
            for v in order[:m]:
                out[b, v] += sign * scores[leaf[v]]
                sets[0][v] = -1
        for v in range(n):
            if np.isnan(maps[b, v]):
                out[b, v] = np.nan
    return out


@numba.njit(cache=True, nogil=True)
def _by_step(x: _Maps, sign: float, heights: _Reals, H: float, order: _Nodes, key: _Reals) -> int:
    """Voxels with ``sign * x >= heights[0]`` into ``order``, highest step first (a
    counting sort), with ``key[v] = Q[step]``, the sum of ``h ** H`` up to it; their count.
    """
    n_steps = heights.shape[0]
    q = np.zeros(n_steps + 1)
    for k in range(n_steps):
        q[k + 1] = q[k] + heights[k] ** H
    step = np.zeros(x.shape[0], np.int32)
    first = np.zeros(n_steps + 2, np.int64)
    for v in range(x.shape[0]):
        value = sign * x[v]
        if not np.isnan(value):
            step[v] = np.searchsorted(heights, value, side="right")
            first[n_steps - step[v] + 1] += 1  # higher steps come first
    first[0] = 0
    for k in range(1, n_steps + 2):
        first[k] += first[k - 1]
    for v in range(x.shape[0]):
        if step[v] > 0:
            slot = n_steps - step[v]
            order[first[slot]] = v
            first[slot] += 1
            key[v] = q[step[v]]
    return first[n_steps - 1]


@numba.njit(cache=True, nogil=True)
def _by_value(x: _Maps, sign: float, H: float, order: _Nodes, key: _Reals) -> int:
    """Voxels with ``sign * x > 0`` into ``order`` by decreasing value, with
    ``key[v] = value ** (H + 1) / (H + 1)``; their count."""
    m = 0
    for v in range(x.shape[0]):
        value = sign * x[v]
        if value > 0:
            order[m] = v
            key[v] = value ** (H + 1.0) / (H + 1.0)
            m += 1
    ranks = np.argsort(-key[order[:m]])
    order[:m] = order[:m][ranks]
    return m


@numba.njit(cache=True, nogil=True)
def _find(parent: _Nodes, v: int) -> int:
    """The root of ``v``'s set, halving the path on the way."""
    while parent[v] != v:
        parent[v] = parent[parent[v]]
        v = parent[v]
    return v


@numba.njit(cache=True, nogil=True)
def _merge_tree(
    order: _Nodes,
    key: _Reals,
    E: float,
    indptr: _Ints,
    indices: _Nodes,
    sets: tuple[_Nodes, _Nodes, _Nodes],
    weights: _Reals,
    extent: _Reals,
    leaf: _Nodes,
    tree: _Tree,
) -> None:
    """Add the voxels of ``order`` (non-increasing ``key``) with a union-find, building
    the merge tree of their clusters; ``tree[1][leaf[v]]`` is then voxel ``v``'s score.

    ``sets`` is the union-find (``parent``, -1 for voxels not added; ``size`` and
    ``current``, the open tree node, of each root; ``extent``, the sum of its nodes'
    ``weights``, the cluster's extent). A tree node is one cluster over a span
    of keys, from ``start[d]`` down to where it merged into node ``up[d]``. A cluster that
    grows at the key it formed at keeps its node; otherwise a new node starts. ``closed``
    lists nodes as they close, children before parents.
    """
    parent, size, current = sets
    start, score, up, closed = tree
    n_nodes = n_closed = 0
    for v in order:
        here = key[v]
        parent[v], size[v], current[v] = v, 1, -1  # no node until it has a cluster
        extent[v] = weights[v]
        root = v
        for e in range(indptr[v], indptr[v + 1]):
            u = indices[e]
            if parent[u] < 0:
                continue
            other = _find(parent, u)
            if other == root:
                continue
            if size[root] < size[other]:
                root, other = other, root
            a, b = current[root], current[other]
            if a >= 0 and start[a] == here:
                keep = a
            elif b >= 0 and start[b] == here:
                keep = b
            else:  # a new node; at most one per voxel, as the next merges keep it
                keep, start[n_nodes] = n_nodes, here
                n_nodes += 1
            if a >= 0 and a != keep:
                n_closed = _close(a, extent[root], here, keep, E, tree, n_closed)
            if b >= 0 and b != keep:
                n_closed = _close(b, extent[other], here, keep, E, tree, n_closed)
            parent[other] = root
            size[root] += size[other]
            extent[root] += extent[other]
            current[root] = keep
        if current[root] < 0:  # a voxel on its own
            current[root], start[n_nodes] = n_nodes, here
            n_nodes += 1
        leaf[v] = current[root]
    for v in order:
        if parent[v] == v:
            n_closed = _close(current[v], extent[v], 0.0, -1, E, tree, n_closed)
    for j in range(n_closed - 1, -1, -1):  # parents before children: sum down the tree
        d = closed[j]
        if up[d] >= 0:
            score[d] += score[up[d]]


@numba.njit(cache=True, nogil=True)
def _close(
    d: int, extent: float, end: float, into: int, E: float, tree: _Tree, n_closed: int
) -> int:
    """Close node ``d`` (a cluster of ``extent``, voxels or their weights) at key ``end``,
    under node ``into`` (-1: none); the new count of closed nodes."""
    start, score, up, closed = tree
    score[d] = extent**E * (start[d] - end)
    up[d] = into
    closed[n_closed] = d
    return n_closed + 1


# --- clusters --------------------------------------------------------------------------


def clusters(
    maps: ArrayLike, graph: Graph, threshold: float, *, two_sided: bool = False
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """The largest cluster extent and the largest cluster mass of each map.

    Parameters
    ----------
    maps : array_like, shape (V,) or (B, V)
        Statistic maps, one value per node of ``graph``.
    graph : Graph
        Neighbourhoods of the nodes.
    threshold : float
        Cluster-forming threshold (>= 0): clusters are components of ``value >
        threshold`` (and, with ``two_sided``, separately of ``value < -threshold``).
    two_sided : bool
        Let negative clusters compete too.

    Returns
    -------
    extent : ndarray of int64, shape ``maps.shape[:-1]``
        Voxels in the largest cluster (0 without any).
    mass : ndarray of float64, shape ``maps.shape[:-1]``
        The largest ``sum(|value| - threshold)`` over a cluster (0 without any); the
        largest extent and mass may come from different clusters.

    Raises
    ------
    ValueError
        If the maps do not match the graph, hold infinite values, or the threshold is
        negative.

    Examples
    --------
    >>> chain = voxel_graph([[0, 0, i] for i in range(6)])
    >>> clusters([[3.0, 2.5, 0.0, 4.0, 0.0, 0.0], [0.0, -3.0, -3.0, -3.0, 0.0, 2.0]],
    ...          chain, 2.0, two_sided=True)
    (array([2, 3]), array([2., 3.]))
    """
    cut = _threshold(threshold)
    batch = _batch(maps, graph)
    extent, mass = _largest(batch, cut, bool(two_sided), graph.indptr, graph.indices)
    shape = np.shape(maps)[:-1]
    return np.asarray(extent).reshape(shape), np.asarray(mass).reshape(shape)


def label(
    map: ArrayLike, graph: Graph, threshold: float, *, two_sided: bool = False
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """The clusters of one map: labels, extents and masses.

    Parameters
    ----------
    map : array_like, shape (V,)
        One statistic map, one value per node of ``graph``.
    graph : Graph
        Neighbourhoods of the nodes.
    threshold : float
        Cluster-forming threshold (>= 0), as in :func:`clusters`.
    two_sided : bool
        Also label the negative clusters (``value < -threshold``).

    Returns
    -------
    labels : ndarray of int64, shape (V,)
        0 outside clusters, else ``1..K`` by decreasing extent (ties: the cluster with the
        lower first node first).
    extents : ndarray of int64, shape (K,)
        Voxels in each cluster.
    masses : ndarray of float64, shape (K,)
        ``sum(|value| - threshold)`` over each cluster (positive for either sign).

    Raises
    ------
    ValueError
        If ``map`` is not one map over the graph, holds infinite values, or the threshold
        is negative.

    Examples
    --------
    >>> chain = voxel_graph([[0, 0, i] for i in range(6)])
    >>> label([3.0, 0.0, -3.0, -2.5, 0.0, 2.5], chain, 2.0, two_sided=True)
    (array([2, 0, 1, 1, 0, 3]), array([2, 1, 1]), array([1.5, 1. , 0.5]))
    """
    if np.ndim(map) != 1:
        raise ValueError(f"map has shape {np.shape(map)}; expected one map ({graph.n},)")
    cut = _threshold(threshold)
    batch = _batch(map, graph)
    labels, extents, masses = _components_of(
        batch[0], cut, bool(two_sided), graph.indptr, graph.indices
    )
    order = np.argsort(-extents, kind="stable")
    rank = np.zeros(len(extents) + 1, dtype=np.int64)
    rank[order + 1] = np.arange(1, len(extents) + 1)
    return rank[labels], extents[order], masses[order]


@numba.njit(cache=True, nogil=True)
def _largest(
    maps: _Maps, threshold: float, two_sided: bool, indptr: _Ints, indices: _Nodes
) -> tuple[_Ints, _Reals]:
    """Per row of ``maps``, the largest cluster extent and mass."""
    n_maps, n = maps.shape
    labels = np.empty(n, np.int64)
    stack = np.empty(n, np.int64)
    extent = np.empty(n + 1, np.int64)
    mass = np.empty(n + 1)
    top_extent = np.zeros(n_maps, np.int64)
    top_mass = np.zeros(n_maps)
    for b in range(n_maps):
        k = _components(maps[b], threshold, two_sided, indptr, indices, labels, stack, extent, mass)
        for c in range(1, k + 1):
            top_extent[b] = max(top_extent[b], extent[c])
            top_mass[b] = max(top_mass[b], mass[c])
    return top_extent, top_mass


@numba.njit(cache=True, nogil=True)
def _components_of(
    x: _Maps, threshold: float, two_sided: bool, indptr: _Ints, indices: _Nodes
) -> tuple[_Ints, _Ints, _Reals]:
    """Labels (in order of each cluster's first node), extents and masses of one map."""
    n = x.shape[0]
    labels = np.empty(n, np.int64)
    extent = np.empty(n + 1, np.int64)
    mass = np.empty(n + 1)
    k = _components(
        x, threshold, two_sided, indptr, indices, labels, np.empty(n, np.int64), extent, mass
    )
    return labels, extent[1 : k + 1].copy(), mass[1 : k + 1].copy()


@numba.njit(cache=True, nogil=True)
def _side(value: float, threshold: float, two_sided: bool) -> int:
    """1 above the threshold, -1 below its negative (two-sided), else 0 (NaN too)."""
    if value > threshold:
        return 1
    if two_sided and value < -threshold:
        return -1
    return 0


@numba.njit(cache=True, nogil=True)
def _components(
    x: _Maps,
    threshold: float,
    two_sided: bool,
    indptr: _Ints,
    indices: _Nodes,
    labels: _Ints,
    stack: _Ints,
    extent: _Ints,
    mass: _Reals,
) -> int:
    """Label the clusters of ``x`` by depth-first search (``labels``: 0 or 1..K, in order
    of each cluster's first node), filling ``extent[1..K]`` and ``mass[1..K]``; K."""
    labels[:] = 0
    k = 0
    for seed in range(x.shape[0]):
        side = _side(x[seed], threshold, two_sided)
        if side == 0 or labels[seed] != 0:
            continue
        k += 1
        labels[seed] = k
        stack[0] = seed
        depth, voxels, total = 1, 0, 0.0
        while depth > 0:
            depth -= 1
            v = stack[depth]
            voxels += 1
            total += side * x[v] - threshold
            for e in range(indptr[v], indptr[v + 1]):
                u = indices[e]
                if labels[u] == 0 and _side(x[u], threshold, two_sided) == side:
                    labels[u] = k
                    stack[depth] = u
                    depth += 1
        extent[k], mass[k] = voxels, total
    return k
