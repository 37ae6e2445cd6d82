"""bigglm.inference.spatial against nilearn: TFCE and cluster measures on the same maps.

nilearn scores 3D volumes with a structuring element; bigglm scores the in-mask voxels
(in C order, as nilearn's maskers) on the matching voxel graph. Through the public API,
``permuted_ols`` (6-connected, E=0.5, H=2, 100 steps); with other parameters, through the
functions it calls (``nilearn.mass_univariate._utils``), skipped if nilearn moves them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nibabel
import numpy as np
import pytest
from nilearn.maskers import NiftiMasker
from nilearn.mass_univariate import permuted_ols
from numpy.typing import NDArray
from scipy import ndimage

from bigglm.inference.spatial import clusters, tfce, voxel_graph
from bigglm.typing import Connectivity

SHAPE = (16, 14, 12)
RANK = {6: 1, 18: 2, 26: 3}


def _nilearn(name: str) -> Callable[..., Any]:
    utils = pytest.importorskip("nilearn.mass_univariate._utils")
    if not hasattr(utils, name):
        pytest.skip(f"this nilearn has no mass_univariate._utils.{name}")
    function: Callable[..., Any] = getattr(utils, name)
    return function


def _mask() -> NDArray[np.bool_]:
    rng = np.random.default_rng(20)
    mask = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2.0) > -0.1
    mask &= rng.random(SHAPE) > 0.05
    return mask


def _maps(mask: NDArray[np.bool_], n: int, seed: int) -> NDArray[np.float64]:
    """``n`` smooth random maps over the mask, with both signs and ties (0.05 grid)."""
    rng = np.random.default_rng(seed)
    volumes = ndimage.gaussian_filter(rng.standard_normal((n, *SHAPE)), (0, 1.4, 1.4, 1.4))
    maps = volumes[:, mask]
    return np.round(3 * maps / maps.std(axis=1, keepdims=True) / 0.05) * 0.05


def _volumes(maps: NDArray[np.float64], mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """As nilearn's ``arr4d``: (X, Y, Z, R), zero outside the mask."""
    out = np.zeros((*SHAPE, len(maps)))
    out[mask] = maps.T
    return out


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("two_sided", [False, True], ids=["one-sided", "two-sided"])
@pytest.mark.parametrize(("E", "H"), [(0.5, 2.0), (1.0, 1.0), (2.0, 0.5)])
def test_tfce_equals_nilearn(
    connectivity: Connectivity, two_sided: bool, E: float, H: float
) -> None:
    calculate_tfce = _nilearn("calculate_tfce")
    mask = _mask()
    maps = _maps(mask, 3, seed=21)
    structure = ndimage.generate_binary_structure(3, RANK[connectivity])
    theirs = calculate_tfce(_volumes(maps, mask), structure, E=E, H=H, two_sided_test=two_sided)
    graph = voxel_graph(np.argwhere(mask), connectivity=connectivity)
    ours = tfce(maps, graph, E=E, H=H, two_sided=two_sided)
    assert np.count_nonzero(ours) > maps.size / 4
    np.testing.assert_allclose(ours, theirs[mask].T, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_steps", [10, 37, 250])
def test_tfce_steps_equal_nilearn_dh(n_steps: int) -> None:
    """nilearn's ``dh = h_max / n_steps`` gives ``n_steps`` heights, as bigglm's option."""
    calculate_tfce = _nilearn("calculate_tfce")
    mask = _mask()
    (x,) = _maps(mask, 1, seed=22)
    dh = np.max(np.abs(x)) / n_steps
    theirs = calculate_tfce(_volumes(x[None], mask), ndimage.generate_binary_structure(3, 1), dh=dh)
    ours = tfce(x, voxel_graph(np.argwhere(mask)), n_steps=n_steps, two_sided=True)
    np.testing.assert_allclose(ours, theirs[mask][:, 0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("two_sided", [False, True], ids=["one-sided", "two-sided"])
@pytest.mark.parametrize("threshold", [0.5, 2.0])
def test_cluster_measures_equal_nilearn(
    connectivity: Connectivity, two_sided: bool, threshold: float
) -> None:
    calculate_cluster_measures = _nilearn("calculate_cluster_measures")
    mask = _mask()
    maps = _maps(mask, 4, seed=23)
    structure = ndimage.generate_binary_structure(3, RANK[connectivity])
    sizes, masses = calculate_cluster_measures(
        _volumes(maps, mask), threshold, structure, two_sided_test=two_sided
    )
    graph = voxel_graph(np.argwhere(mask), connectivity=connectivity)
    extent, mass = clusters(maps, graph, threshold, two_sided=two_sided)
    np.testing.assert_array_equal(extent, sizes)
    np.testing.assert_allclose(mass, masses, rtol=1e-12)


@pytest.mark.parametrize("two_sided", [False, True], ids=["one-sided", "two-sided"])
def test_tfce_equals_permuted_ols(two_sided: bool) -> None:
    """nilearn's public route: ``permuted_ols(..., tfce=True)`` scores its own t map."""
    mask = _mask()
    rng = np.random.default_rng(24)
    age = rng.normal(size=(20, 1))
    effect = _maps(mask, 1, seed=25)
    target = _maps(mask, 20, seed=26) + age * effect
    image = nibabel.Nifti1Image(mask.astype(np.uint8), np.eye(4))
    masker = NiftiMasker(image).fit()
    out = permuted_ols(
        age,
        target,
        n_perm=0,
        tfce=True,
        masker=masker,
        two_sided_test=two_sided,
        output_type="dict",  # nilearn 0.12 defaults to "legacy" (and warns with tfce)
    )
    ours = tfce(out["t"][0], voxel_graph(np.argwhere(mask)), two_sided=two_sided)
    assert np.count_nonzero(ours) > mask.sum() / 4
    np.testing.assert_allclose(ours, out["tfce"][0], rtol=1e-6, atol=0)
