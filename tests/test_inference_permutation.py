"""permutation_test on real group stores: sources, workers, NIfTI maps."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bigglm.exceptions import DesignError, StoreError
from bigglm.group import collect, fit, open_group
from bigglm.inference import permutation_test, write_maps
from tests.group_maps import AFFINE, subject_maps


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("perm")
    effects, _, _, _ = subject_maps(folder / "maps", 12, seed=3, shrink=True, with_variance=False)
    return collect(effects, folder / "group.zarr", chunks=(5, 200))


def _design(store: Path) -> pd.DataFrame:
    subjects = [str(s) for s in open_group(store)["subject"].values]
    age = np.linspace(-10.0, 10.0, len(subjects))
    return pd.DataFrame({"mean": 1.0, "age": age}, index=subjects)


def test_a_group_result_gives_its_store_and_design(store: Path) -> None:
    design = _design(store)
    result = fit(store, design)
    direct = permutation_test(store, design, "age", n_perm=200, seed=5)
    via = permutation_test(result, contrast="age", n_perm=200, seed=5)
    for name in ("t", "p", "p_fwe", "max_t"):
        np.testing.assert_array_equal(direct[name], via[name])
    complete = np.isfinite(direct["t"].values)
    np.testing.assert_allclose(
        direct["t"].values[complete], result.contrast("age")["stat"].values[complete], rtol=1e-5
    )


def test_one_sample_tests_voxels_with_missing_subjects(store: Path) -> None:
    ds = open_group(store)
    design = pd.DataFrame({"mean": 1.0}, index=[str(s) for s in ds["subject"].values])
    out = permutation_test(store, design, n_perm=100, seed=1)
    n = ds["n_subjects"].values
    assert (n < 12).any()  # the store has voxels some subjects miss
    assert np.isfinite(out["t"].values[n >= 3]).all()
    assert out.attrs["scheme"] == "signflip" and out.attrs["n_rearrangements"] == 100


@pytest.mark.cluster
def test_workers_give_the_same_result(store: Path, local_client) -> None:
    design = _design(store)
    here = permutation_test(store, design, "age", n_perm=300, seed=2)
    there = permutation_test(store, design, "age", n_perm=300, seed=2, client=local_client)
    for name in ("p", "p_fwe"):
        np.testing.assert_array_equal(here[name], there[name])
    # BLAS sums in an order that depends on its threads (2 here, 1 in a worker), so
    # statistics agree to rounding, and the p values exactly
    for name in ("t", "max_t"):
        np.testing.assert_allclose(here[name], there[name], rtol=1e-12)


def test_maps_are_written_as_minus_log10_p_on_the_store_grid(store: Path, tmp_path: Path) -> None:
    ds = open_group(store)
    design = pd.DataFrame({"mean": 1.0}, index=[str(s) for s in ds["subject"].values])
    out = permutation_test(store, design, n_perm=64, seed=0)
    paths = write_maps(out, tmp_path, contrast="mean", prefix="task-x")
    assert [p.name for p in paths] == [
        "task-x_contrast-mean_stat-t_statmap.nii.gz",
        "task-x_contrast-mean_stat-logp_statmap.nii.gz",
        "task-x_contrast-mean_stat-logpmaxt_statmap.nii.gz",
    ]
    image = nib.load(paths[2])
    np.testing.assert_allclose(image.affine, AFFINE)
    mask = np.asarray(ds["mask"].values, dtype=bool)
    values = np.asarray(image.dataobj)[mask]
    np.testing.assert_allclose(values, -np.log10(out["p_fwe"].values), rtol=1e-6)
    assert np.isnan(np.asarray(image.dataobj)[~mask]).all()
    with pytest.raises(StoreError):
        write_maps(out, tmp_path, contrast="mean", prefix="task-x")  # no overwrite=True
    user_file = tmp_path / "group_contrast-mean_stat-t_statmap.nii.gz"
    user_file.write_bytes(b"not bigglm's")
    with pytest.raises(StoreError):
        write_maps(out, tmp_path, contrast="mean", overwrite=True)
    assert user_file.read_bytes() == b"not bigglm's"


def test_spatial_options_are_checked(store: Path) -> None:
    design = _design(store)
    with pytest.raises(DesignError, match="connectivity"):
        permutation_test(store, design, "age", tfce=True, connectivity=8)
    with pytest.raises(DesignError, match="positive t"):
        permutation_test(store, design, "age", cluster_threshold=-1.0)
