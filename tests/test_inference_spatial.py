"""bigglm.inference.spatial against plain references: adjacency from loops and scipy's
structuring elements, labels from ``scipy.ndimage.label`` and ``scipy.sparse.csgraph``,
TFCE summed over step heights one labelling at a time, exact TFCE by numerical
integration.
"""

from __future__ import annotations

import random
from itertools import combinations, pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

from bigglm.inference import spatial
from bigglm.inference.spatial import Graph, clusters, label, mesh_graph, tfce, voxel_graph
from bigglm.typing import Connectivity

SHAPE = (14, 12, 10)
RANK = {6: 1, 18: 2, 26: 3}


# --- fixtures and references -------------------------------------------------------------


def _mask(seed: int) -> NDArray[np.bool_]:
    """An irregular mask: a smooth blob with holes, speckle and a detached piece."""
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2.0) > -0.05
    mask &= rng.random(SHAPE) > 0.08
    mask[0, 0, :3] = True
    mask[1, :, :] = False
    return mask


def _smooth(seed: int, mask: NDArray[np.bool_], *, decimals: int | None = 1) -> NDArray:
    """A smooth random map over the mask's voxels, by default on a 0.1 grid (ties)."""
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.3)
    values = 2.5 * volume[mask] / volume[mask].std()
    return values if decimals is None else np.round(values, decimals)


def _volume(values: NDArray, mask: NDArray[np.bool_], fill: float = 0.0) -> NDArray:
    out = np.full(mask.shape, fill)
    out[mask] = values
    return out


def _structure(connectivity: Connectivity) -> NDArray[np.bool_]:
    return ndimage.generate_binary_structure(3, RANK[connectivity])


def _adjacency(graph: Graph) -> NDArray[np.bool_]:
    dense = np.zeros((graph.n, graph.n), dtype=bool)
    dense[np.repeat(np.arange(graph.n), np.diff(graph.indptr)), graph.indices] = True
    return dense


def _plain_adjacency(ijk: NDArray, connectivity: int) -> NDArray[np.bool_]:
    """Voxels ``a``, ``b`` are neighbours when ``b - a`` is set in scipy's structure."""
    steps = ijk[None, :, :] - ijk[:, None, :]
    near = np.abs(steps).max(axis=-1) == 1
    idx = np.clip(steps + 1, 0, 2)
    return near & _structure(connectivity)[idx[..., 0], idx[..., 1], idx[..., 2]]


def _tfce_reference(
    x: NDArray,
    mask: NDArray[np.bool_],
    connectivity: int,
    *,
    E: float = 0.5,
    H: float = 2.0,
    n_steps: int = 100,
    two_sided: bool = False,
) -> NDArray:
    """The fslmaths/nilearn sum: one scipy labelling per step height."""
    top = np.nanmax(np.abs(x)) if two_sided else np.nanmax(x)
    out = np.zeros(x.shape)
    if not top > 0:
        return out
    for sign in (1, -1) if two_sided else (1,):
        volume = _volume(sign * x, mask, np.nan)
        for h in np.linspace(0, top, n_steps + 1)[1:]:
            labels, _ = ndimage.label(volume >= h, _structure(connectivity))
            sizes = np.bincount(labels.ravel()).astype(float)
            inside = labels[mask]
            out += np.where(inside > 0, sign * sizes[inside] ** E * h**H, 0.0)
    return out


def _graph_from_edges(n: int, edges: list[tuple[int, int]]) -> Graph:
    rows = [a for a, b in edges if a != b] + [b for a, b in edges if a != b]
    cols = [b for a, b in edges if a != b] + [a for a, b in edges if a != b]
    matrix = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    matrix.sum_duplicates()
    matrix.sort_indices()
    return Graph(matrix.indptr, matrix.indices, n)


def _components(graph: Graph, chosen: NDArray[np.bool_]) -> tuple[NDArray, NDArray]:
    """Component of each chosen node (-1 elsewhere) and component sizes, by csgraph."""
    matrix = sparse.csr_matrix(
        (np.ones(graph.indices.size), graph.indices, graph.indptr), shape=(graph.n, graph.n)
    )
    nodes = np.flatnonzero(chosen)
    _, labels = connected_components(matrix[nodes][:, nodes], directed=False)
    out = np.full(graph.n, -1)
    out[nodes] = labels
    return out, np.bincount(labels, minlength=1)


# --- graphs ------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_voxel_graph_is_the_plain_adjacency(connectivity: Connectivity) -> None:
    ijk = np.argwhere(_mask(0))
    graph = voxel_graph(ijk, connectivity=connectivity)
    assert graph.indptr.dtype == np.int64 and graph.indices.dtype == np.int32
    assert graph.n == len(ijk) and graph.indices.size == 2 * graph.n_edges
    np.testing.assert_array_equal(_adjacency(graph), _plain_adjacency(ijk, connectivity))
    rows = np.split(graph.indices, graph.indptr[1:-1])
    assert all(np.all(np.diff(row) > 0) for row in rows)  # sorted, no repeats


def test_voxel_graph_follows_the_voxel_order() -> None:
    ijk = np.argwhere(_mask(1))
    shuffled = np.random.default_rng(1).permutation(len(ijk))
    graph = voxel_graph(ijk[shuffled], connectivity=18)
    np.testing.assert_array_equal(_adjacency(graph), _plain_adjacency(ijk[shuffled], 18))


def test_voxel_graph_of_a_sparse_box_searches() -> None:
    """Voxels 10**7 apart: the bounding box is too large to tabulate, the graph the same."""
    ijk = np.argwhere(_mask(2)[:6])
    far = np.concatenate([ijk, ijk[:50] + np.array([10**7, 0, -(10**6)])])
    assert np.prod(np.ptp(far, axis=0) + 3) > spatial._DENSE_CELLS
    graph = voxel_graph(far, connectivity=26)
    np.testing.assert_array_equal(_adjacency(graph), _plain_adjacency(far, 26))


@pytest.mark.parametrize("far", [False, True], ids=["dense", "sparse"])
def test_voxel_graph_rejects_repeats(far: bool) -> None:
    ijk = [[0, 0, 0], [0, 0, 1], [0, 0, 0], [10**8 if far else 2, 0, 0]]
    with pytest.raises(ValueError, match="repeats a voxel"):
        voxel_graph(ijk)


def test_voxel_graph_errors() -> None:
    with pytest.raises(ValueError, match=r"expected \(V, 3\)"):
        voxel_graph(np.zeros((4, 2), dtype=int))
    with pytest.raises(TypeError, match="expected integer"):
        voxel_graph(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="expected 6, 18 or 26"):
        voxel_graph(np.zeros((1, 3), dtype=int), connectivity=8)  # type: ignore[arg-type]
    assert voxel_graph(np.zeros((0, 3), dtype=int)).n == 0


def test_mesh_graph_is_the_edges_of_the_faces() -> None:
    """A triangulated 5 x 4 grid, a degenerate face and a vertex in no face."""
    rng = np.random.default_rng(3)
    corner = np.arange(20).reshape(5, 4)
    faces = [
        tri
        for i in range(4)
        for j in range(3)
        for tri in (
            (corner[i, j], corner[i + 1, j], corner[i, j + 1]),
            (corner[i + 1, j], corner[i + 1, j + 1], corner[i, j + 1]),
        )
    ]
    faces = np.array([*faces, (3, 3, 7)])[rng.permutation(len(faces) + 1)]
    graph = mesh_graph(faces, 21)
    edges = {(a, b) for face in faces for a, b in combinations(face.tolist(), 2) if a != b}
    expected = np.zeros((21, 21), dtype=bool)
    for a, b in edges:
        expected[a, b] = expected[b, a] = True
    np.testing.assert_array_equal(_adjacency(graph), expected)
    assert graph.indices.size == expected.sum() and graph.indptr[-1] == graph.indptr[-2]
    with pytest.raises(ValueError, match=r"expected 0\.\.20"):
        mesh_graph([[0, 1, 21]], 21)
    with pytest.raises(ValueError, match=r"expected \(F, 3\)"):
        mesh_graph([[0, 1]], 21)


def test_graph_checks_its_arrays() -> None:
    with pytest.raises(ValueError, match=r"n \+ 1 offsets"):
        Graph(np.array([0, 1]), np.array([1]), 2)
    with pytest.raises(ValueError, match=r"expected 0\.\.1"):
        Graph(np.array([0, 1, 2]), np.array([1, 2]), 2)
    graph = voxel_graph([[0, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="read-only"):
        graph.indices[0] = 1


# --- clusters ----------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("two_sided", [False, True], ids=["one-sided", "two-sided"])
@pytest.mark.parametrize("threshold", [0.0, 1.2])
def test_label_partitions_as_scipy(
    connectivity: Connectivity, two_sided: bool, threshold: float
) -> None:
    mask = _mask(4)
    x = _smooth(4, mask)
    graph = voxel_graph(np.argwhere(mask), connectivity=connectivity)
    labels, extents, masses = label(x, graph, threshold, two_sided=two_sided)

    volume = _volume(x, mask, np.nan)
    signs = (1, -1) if two_sided else (1,)
    scipy_labels = [ndimage.label(s * volume > threshold, _structure(connectivity)) for s in signs]
    expected = [(s, lab[mask], k) for s, (lab, k) in zip(signs, scipy_labels, strict=True)]
    assert len(extents) == sum(k for _, _, k in expected) >= 2
    for cluster in range(1, len(extents) + 1):
        inside = labels == cluster
        sign = 1 if x[inside][0] > 0 else -1
        theirs = next(lab for s, lab, _ in expected if s == sign)
        (only,) = np.unique(theirs[inside])  # one scipy cluster, and all of it
        assert only > 0 and np.count_nonzero(theirs == only) == extents[cluster - 1]
        assert masses[cluster - 1] == pytest.approx(np.sum(np.abs(x[inside]) - threshold))
    assert np.count_nonzero(labels) == sum(np.count_nonzero(lab) for _, lab, _ in expected)
    firsts = [np.flatnonzero(labels == c)[0] for c in range(1, len(extents) + 1)]
    keys = [(-e, f) for e, f in zip(extents, firsts, strict=True)]
    assert keys == sorted(keys)  # by decreasing extent, then first node


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("two_sided", [False, True], ids=["one-sided", "two-sided"])
def test_clusters_are_the_largest_scipy_clusters(
    connectivity: Connectivity, two_sided: bool
) -> None:
    mask = _mask(5)
    maps = np.stack([_smooth(seed, mask) for seed in range(6)] + [np.zeros(mask.sum())])
    graph = voxel_graph(np.argwhere(mask), connectivity=connectivity)
    extent, mass = clusters(maps, graph, 1.0, two_sided=two_sided)
    assert extent.shape == mass.shape == (7,) and extent.dtype == np.int64
    for b, x in enumerate(maps):
        sizes, masses = [0], [0.0]
        for sign in (1, -1) if two_sided else (1,):
            volume = sign * _volume(x, mask, np.nan)
            labels, k = ndimage.label(volume > 1.0, _structure(connectivity))
            index = np.arange(1, k + 1)
            sizes += list(ndimage.sum_labels(np.ones(SHAPE), labels, index))
            masses += list(ndimage.sum_labels(volume - 1.0, labels, index))
        assert extent[b] == max(sizes)
        assert mass[b] == pytest.approx(max(masses), rel=1e-12)
    one_extent, one_mass = clusters(maps[0], graph, 1.0, two_sided=two_sided)
    assert one_extent.shape == () and (one_extent, one_mass) == (extent[0], mass[0])


def test_cluster_threshold_is_strict_and_non_negative() -> None:
    chain = voxel_graph([[0, 0, i] for i in range(4)])
    assert clusters([1.0, 2.0, 1.0, 3.0], chain, 1.0)[0] == 1  # >= would join all four
    with pytest.raises(ValueError, match="expected a finite value >= 0"):
        clusters([1.0, 2.0, 1.0, 3.0], chain, -1.0)
    with pytest.raises(ValueError, match="one map"):
        label(np.zeros((2, 4)), chain, 1.0)


# --- TFCE --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [6, 7, 8])
@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("two_sided", [False, True], ids=["one-sided", "two-sided"])
def test_tfce_is_the_sum_over_steps(seed: int, connectivity: Connectivity, two_sided: bool) -> None:
    mask = _mask(seed)
    x = _smooth(seed, mask)  # ties: values on a 0.1 grid
    graph = voxel_graph(np.argwhere(mask), connectivity=connectivity)
    expected = _tfce_reference(x, mask, connectivity, two_sided=two_sided)
    got = tfce(x, graph, two_sided=two_sided)
    assert got.dtype == np.float64 and np.all(got * x >= 0) and np.any(got < 0) == two_sided
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("E", "H", "n_steps"), [(1.0, 1.0, 100), (0.5, 2.0, 7), (2.0, 0.5, 1), (0.0, 3.0, 40)]
)
def test_tfce_parameters(E: float, H: float, n_steps: int) -> None:
    mask = _mask(9)
    x = _smooth(9, mask, decimals=None)
    graph = voxel_graph(np.argwhere(mask), connectivity=18)
    for two_sided in (False, True):
        expected = _tfce_reference(x, mask, 18, E=E, H=H, n_steps=n_steps, two_sided=two_sided)
        got = tfce(x, graph, E=E, H=H, n_steps=n_steps, two_sided=two_sided)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_tfce_counts_values_at_a_step_height() -> None:
    """Values drawn from the step heights themselves: ``value >= h`` includes the tie."""
    mask = _mask(10)
    heights = np.linspace(0, 3.0, 101)[1:]
    x = np.random.default_rng(10).choice(np.concatenate([heights, -heights]), mask.sum())
    x[0] = 3.0
    graph = voxel_graph(np.argwhere(mask), connectivity=6)
    for two_sided in (False, True):
        expected = _tfce_reference(x, mask, 6, two_sided=two_sided)
        np.testing.assert_allclose(tfce(x, graph, two_sided=two_sided), expected, rtol=1e-6)


def test_tfce_batch_dtypes_and_empty_maps() -> None:
    mask = _mask(11)
    graph = voxel_graph(np.argwhere(mask), connectivity=26)
    maps = np.stack([_smooth(s, mask) for s in range(4)] + [-np.abs(_smooth(4, mask))])
    batch = tfce(maps, graph, two_sided=False)
    for row, x in zip(batch, maps, strict=True):
        np.testing.assert_array_equal(row, tfce(x, graph))
    assert np.all(batch[-1] == 0)  # nothing positive
    single = maps.astype(np.float32)
    np.testing.assert_array_equal(tfce(single, graph), tfce(single.astype(np.float64), graph))
    integers = np.round(maps).astype(int)
    np.testing.assert_array_equal(tfce(integers, graph), tfce(integers.astype(float), graph))
    assert tfce(np.zeros((0, graph.n)), graph).shape == (0, graph.n)


def test_tfce_nan_splits_clusters() -> None:
    """A NaN voxel is never in a cluster (as if outside the mask), and scores NaN."""
    mask = _mask(12)
    x = _smooth(12, mask)
    x[np.argsort(x)[-40:-30]] = np.nan
    graph = voxel_graph(np.argwhere(mask), connectivity=6)
    got = tfce(x, graph, two_sided=True)
    assert np.array_equal(np.isnan(got), np.isnan(x))
    reduced = mask.copy()
    reduced[mask] = ~np.isnan(x)
    expected = _tfce_reference(x[~np.isnan(x)], reduced, 6, two_sided=True)
    np.testing.assert_allclose(got[~np.isnan(x)], expected, rtol=1e-6)
    extent, _ = clusters(x, graph, 0.5)
    labels, *_ = label(x, graph, 0.5)
    assert np.all(labels[np.isnan(x)] == 0) and extent == np.bincount(labels)[1:].max()


def test_tfce_errors() -> None:
    chain = voxel_graph([[0, 0, i] for i in range(3)])
    with pytest.raises(ValueError, match=r"expected \(3,\) or \(B, 3\)"):
        tfce(np.zeros(4), chain)
    with pytest.raises(ValueError, match="infinite"):
        tfce([1.0, np.inf, 0.0], chain)
    with pytest.raises(TypeError, match="real numbers"):
        tfce(np.zeros(3, dtype=complex), chain)
    with pytest.raises(ValueError, match="n_steps"):
        tfce(np.zeros(3), chain, n_steps=0)
    with pytest.raises(ValueError, match="exponents"):
        tfce(np.zeros(3), chain, E=-1.0)


@pytest.mark.parametrize(("connectivity", "two_sided"), [(6, True), (26, False)])
def test_exact_tfce_is_the_integral(connectivity: Connectivity, two_sided: bool) -> None:
    """Against a 20,000-step midpoint sum of ``e(h) ** E h ** H dh``.

    The midpoint sum is off by at most one step's worth, ``dh * value ** H * e ** E``, at
    each change of the extent ``e`` (their total variation is below ``e(0) ** E``) and at
    the upper limit; the tolerance is twice that, per voxel.
    """
    mask = _mask(13)
    x = _smooth(13, mask, decimals=None)
    graph = voxel_graph(np.argwhere(mask), connectivity=connectivity)
    got = tfce(x, graph, two_sided=two_sided, exact=True)
    n, top = 20_000, np.max(np.abs(x))
    dh = top / n
    expected, first = np.zeros(x.shape), np.zeros(x.shape)
    for sign in (1, -1) if two_sided else (1,):
        volume = _volume(sign * x, mask, np.nan)
        for h in (np.arange(n) + 0.5) * dh:
            labels, _ = ndimage.label(volume >= h, _structure(connectivity))
            sizes = np.bincount(labels.ravel()).astype(float)
            inside = labels[mask]
            expected += np.where(inside > 0, sign * sizes[inside] ** 0.5 * h**2 * dh, 0.0)
            first = np.maximum(first, np.where(inside > 0, sizes[inside], 0.0))
    bound = 2 * dh * np.abs(x) ** 2 * first**0.5 + 1e-12
    assert np.all(np.abs(got - expected) <= bound)
    assert np.count_nonzero(got) > 0.3 * len(x)


# --- properties on random graphs ---------------------------------------------------------


@st.composite
def _graph_and_maps(draw: st.DrawFn) -> tuple[Graph, NDArray]:
    n = draw(st.integers(1, 14))
    pairs = list(combinations(range(n), 2))
    edges = draw(st.lists(st.sampled_from(pairs), max_size=3 * n)) if pairs else []
    values = st.integers(-4, 4).map(lambda v: v / 2)  # ties, zeros, both signs
    maps = draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=1, max_size=3))
    return _graph_from_edges(n, edges), np.array(maps)


def _tfce_on_graph(graph: Graph, x: NDArray, n_steps: int, two_sided: bool) -> NDArray:
    top = np.max(np.abs(x)) if two_sided else np.max(x)
    out = np.zeros(x.shape)
    for sign in (1, -1) if two_sided else (1,):
        for h in np.linspace(0, top, n_steps + 1)[1:] if top > 0 else []:
            labels, sizes = _components(graph, sign * x >= h)
            out += np.where(labels >= 0, sign * sizes[labels] ** 0.5 * h**2, 0.0)
    return out


def _exact_on_graph(graph: Graph, x: NDArray, two_sided: bool) -> NDArray:
    """The piecewise integral, one component labelling per distinct value."""
    out = np.zeros(x.shape)
    for sign in (1, -1) if two_sided else (1,):
        levels = np.unique(np.concatenate([[0.0], sign * x[sign * x > 0]]))
        for low, high in pairwise(levels):
            labels, sizes = _components(graph, sign * x >= high)
            part = (high**3 - low**3) / 3
            out += np.where(labels >= 0, sign * sizes[labels] ** 0.5 * part, 0.0)
    return out


@settings(max_examples=150, deadline=None)
@given(_graph_and_maps(), st.integers(1, 12), st.booleans())
def test_tfce_on_random_graphs(case: tuple[Graph, NDArray], n_steps: int, two_sided: bool) -> None:
    graph, maps = case
    got = tfce(maps, graph, n_steps=n_steps, two_sided=two_sided)
    exact = tfce(maps, graph, two_sided=two_sided, exact=True)
    for b, x in enumerate(maps):
        expected = _tfce_on_graph(graph, x, n_steps, two_sided)
        np.testing.assert_allclose(got[b], expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(exact[b], _exact_on_graph(graph, x, two_sided), rtol=1e-9)


@settings(max_examples=150, deadline=None)
@given(_graph_and_maps(), st.sampled_from([0.0, 0.5, 1.0]), st.booleans())
def test_clusters_on_random_graphs(
    case: tuple[Graph, NDArray], threshold: float, two_sided: bool
) -> None:
    graph, maps = case
    extent, mass = clusters(maps, graph, threshold, two_sided=two_sided)
    for b, x in enumerate(maps):
        sizes, masses = [0], [0.0]
        for sign in (1, -1) if two_sided else (1,):
            labels, counts = _components(graph, sign * x > threshold)
            if (labels >= 0).any():
                sizes += list(counts)
                masses += list(np.bincount(labels[labels >= 0], sign * x[labels >= 0] - threshold))
        assert extent[b] == max(sizes) and mass[b] == pytest.approx(max(masses))
        labels_b, extents_b, _ = label(x, graph, threshold, two_sided=two_sided)
        assert sorted(extents_b, reverse=True) == sorted(sizes[1:], reverse=True)
        assert list(extents_b) == list(np.bincount(labels_b, minlength=1)[1:])


@settings(max_examples=60, deadline=None)
@given(_graph_and_maps(), st.randoms(use_true_random=False), st.booleans())
def test_results_follow_a_renumbering(
    case: tuple[Graph, NDArray], rnd: random.Random, two_sided: bool
) -> None:
    """Renumbering the nodes renumbers TFCE values and cluster labels, nothing else."""
    graph, maps = case
    perm = np.array(rnd.sample(range(graph.n), graph.n))
    inverse = np.argsort(perm)
    src = np.repeat(np.arange(graph.n), np.diff(graph.indptr))
    moved = _graph_from_edges(graph.n, list(zip(inverse[src], inverse[graph.indices], strict=True)))
    np.testing.assert_allclose(
        tfce(maps[:, perm], moved, two_sided=two_sided),
        tfce(maps, graph, two_sided=two_sided)[:, perm],
        rtol=1e-12,
    )
    labels, extents, _ = label(maps[0], graph, 0.5, two_sided=two_sided)
    moved_labels, moved_extents, _ = label(maps[0, perm], moved, 0.5, two_sided=two_sided)
    assert sorted(extents) == sorted(moved_extents)
    pairs = set(zip(labels[perm].tolist(), moved_labels.tolist(), strict=True))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
