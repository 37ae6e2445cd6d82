"""bigglm.group.collect / open_group: maps to a group store and back, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from group_maps import AFFINE, SHAPE, brain, subject_maps

import bigglm
from bigglm.exceptions import DesignError, StoreError
from bigglm.group import collect, open_group
from bigglm.io.artefacts import kind_of

pytestmark = pytest.mark.usefixtures("threads_scheduler")

PEER = Path(__file__).resolve().parents[2] / "shared" / "peer-data"
FEAT_STATS = PEER / "fsl_film_realdata" / "1stlevel_realdata.feat" / "stats"


def test_round_trip_maps_store_nifti_is_exact(tmp_path: Path) -> None:
    effects, variances, truth, truth_var = subject_maps(tmp_path / "maps", 5, shrink=True)
    store = collect(effects, tmp_path / "group.zarr", variances=variances, chunks=(2, 100))
    ds = open_group(store)
    union = np.isfinite(truth).any(axis=0)
    assert ds.sizes == {"subject": 5, "voxel": int(union.sum()), "x": 10, "y": 12, "z": 8}
    assert ds.effect.data.chunks[0] == (2, 2, 1)  # chunked in subjects too
    assert np.array_equal(ds["mask"].values, union)
    assert ds.subject.values.tolist() == [f"sub-{i:03d}" for i in range(1, 6)]
    assert np.array_equal(ds.n_subjects.values, np.isfinite(truth).sum(axis=0)[union])
    for s in range(5):
        out = bigglm.to_nifti(ds.effect[s], ds, tmp_path / f"back-{s}.nii.gz")
        back = nib.load(out)
        assert np.allclose(back.affine, AFFINE)
        np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), truth[s])
        np.testing.assert_array_equal(ds.variance.values[s], truth_var[s][union])


def test_store_records_sources_with_sha256_and_is_marked(tmp_path: Path) -> None:
    import hashlib

    effects, variances, _, _ = subject_maps(tmp_path / "maps", 3)
    store = collect(effects, tmp_path / "g.zarr", variances=variances)
    attrs = open_group(store).attrs
    first = attrs["sources"][0]
    assert first["subject"] == "sub-001"
    assert first["effect"]["sha256"] == hashlib.sha256(effects[0].read_bytes()).hexdigest()
    assert first["variance"]["path"] == str(variances[0].resolve())
    assert attrs["parameters"]["missing"] == "nan-or-zero"
    assert kind_of(store) == "group-store"
    meta = json.loads((store / "zarr.json").read_text())["attributes"]
    assert meta["complete"] is True


def test_zero_outside_coverage_is_missing_as_fsl_and_nilearn_write_it(tmp_path: Path) -> None:
    nan_maps, nan_var, truth, _ = subject_maps(tmp_path / "nan", 4, shrink=True, seed=3)
    zero_maps, zero_var, _, _ = subject_maps(tmp_path / "zero", 4, shrink=True, seed=3, outside=0.0)
    a = open_group(collect(nan_maps, tmp_path / "a.zarr", variances=nan_var))
    b = open_group(collect(zero_maps, tmp_path / "b.zarr", variances=zero_var))
    np.testing.assert_array_equal(a.effect.values, b.effect.values)
    np.testing.assert_array_equal(a.n_subjects.values, b.n_subjects.values)
    # with missing="nan", the zeros are values: every grid voxel is covered
    c = open_group(collect(zero_maps, tmp_path / "c.zarr", missing="nan"))
    assert c.sizes["voxel"] == int(np.prod(SHAPE))
    assert int((c.effect.values == 0).sum()) == int(np.isnan(truth).sum())


def test_fsl_cope_and_varcope_files_of_a_real_feat_are_read_exactly(tmp_path: Path) -> None:
    copes = sorted(FEAT_STATS.glob("cope*.nii.gz"))
    varcopes = [FEAT_STATS / p.name.replace("cope", "varcope") for p in copes]
    assert len(copes) >= 2
    labels = [f"sub-{i}" for i in range(len(copes))]
    ds = open_group(collect(copes, tmp_path / "fsl.zarr", variances=varcopes, subjects=labels))
    cope = nib.load(copes[0]).get_fdata(dtype=np.float32)
    assert np.array_equal(
        ds["mask"].values, np.any([nib.load(p).get_fdata() != 0 for p in copes], axis=0)
    )
    values = ds.effect.values[0]
    flat = cope[ds["mask"].values]
    np.testing.assert_array_equal(values[np.isfinite(values)], flat[flat != 0])
    assert np.isnan(values[flat == 0]).all()
    varcope = nib.load(varcopes[0]).get_fdata(dtype=np.float32)[ds["mask"].values]
    np.testing.assert_array_equal(ds.variance.values[0], np.where(flat != 0, varcope, np.nan))


def test_a_mask_restricts_the_voxels_and_reads_once(tmp_path: Path) -> None:
    effects, _, truth, _ = subject_maps(tmp_path / "maps", 3, with_variance=False)
    mask = brain() & (np.indices(SHAPE)[0] < 5)
    ds = open_group(collect(effects, tmp_path / "g.zarr", mask=mask))
    assert ds.sizes["voxel"] == int(mask.sum())
    np.testing.assert_array_equal(ds.effect.values, truth[:, mask])
    assert "variance" not in ds


def test_subjects_from_a_dict_and_from_bids_folders(tmp_path: Path) -> None:
    effects, _, _, _ = subject_maps(tmp_path / "maps", 2, with_variance=False)
    for s, path in enumerate(effects):  # nilearn-style: one folder per subject
        folder = tmp_path / "nilearn" / f"sub-{s:02d}" / "ses-1"
        folder.mkdir(parents=True)
        shutil.copy(path, folder / "effect_size.nii.gz")
    paths = sorted((tmp_path / "nilearn").rglob("effect_size.nii.gz"))
    ds = open_group(collect(paths, tmp_path / "a.zarr"))
    assert ds.subject.values.tolist() == ["sub-00_ses-1", "sub-01_ses-1"]
    ds = open_group(collect({"b": effects[1], "a": effects[0]}, tmp_path / "b.zarr"))
    assert ds.subject.values.tolist() == ["b", "a"]


def test_bad_input_gets_one_message_naming_the_file_or_subject(tmp_path: Path) -> None:
    effects, variances, _, _ = subject_maps(tmp_path / "maps", 3)
    target = tmp_path / "g.zarr"
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), AFFINE), other)
    with pytest.raises(StoreError, match=r"other\.nii\.gz: shape \(4, 4, 4\) differs"):
        collect([*effects, other], target, subjects=["a", "b", "c", "d"])
    moved = tmp_path / "moved.nii.gz"
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), shifted), moved)
    with pytest.raises(StoreError, match=r"moved\.nii\.gz: affine differs .* 1 mm"):
        collect([*effects, moved], target, subjects=["a", "b", "c", "d"])
    with pytest.raises(DesignError, match="got 3 effect maps but 2 variance maps"):
        collect(effects, target, variances=variances[:2])
    with pytest.raises(DesignError, match="subject 'x' appears twice"):
        collect(effects, target, subjects=["x", "y", "x"])
    with pytest.raises(DesignError, match="no BIDS subject entity"):
        collect([other], target)
    with pytest.raises(DesignError, match="no variance map: b"):
        collect({"a": effects[0], "b": effects[1]}, target, variances={"a": variances[0]})
    data = nib.load(variances[1]).get_fdata(dtype=np.float32)
    data[5, 5, 4] = -0.5
    negative = tmp_path / "sub-002_variance.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), negative)
    with pytest.raises(
        StoreError,
        match=r"sub-002_variance\.nii\.gz: subject 'sub-002' has "
        r"negative variances at 1 voxels",
    ):
        collect(effects, target, variances=[variances[0], negative, variances[2]])
    four_d = tmp_path / "sub-009_4d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((*SHAPE, 2), np.float32), AFFINE), four_d)
    with pytest.raises(StoreError, match="must be one 3D volume"):
        collect([four_d], target)
    with pytest.raises(StoreError, match="no such file"):
        collect([tmp_path / "sub-01_absent.nii.gz"], target)
    assert not target.exists()  # nothing was left behind by any refusal
    assert not list(tmp_path.glob(".g.zarr*"))


def test_existing_store_is_replaced_only_with_overwrite_and_only_if_bigglm_wrote_it(
    tmp_path: Path,
) -> None:
    effects, _, _, _ = subject_maps(tmp_path / "maps", 2, with_variance=False)
    target = collect(effects, tmp_path / "g.zarr")
    with pytest.raises(StoreError, match="overwrite=True"):
        collect(effects, target)
    collect(effects[:1], target, overwrite=True)
    assert open_group(target).sizes["subject"] == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(StoreError, match="refusing to replace"):
        collect(effects, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_open_group_refuses_run_stores_and_incomplete_stores(
    tmp_path: Path, functional_nii: Path
) -> None:
    run = bigglm.convert(functional_nii, tmp_path / "run.zarr", mask=np.ones((17, 21, 3), bool))
    with pytest.raises(StoreError, match="has no array 'effect'"):
        open_group(run)
    effects, _, _, _ = subject_maps(tmp_path / "maps", 2, with_variance=False)
    store = collect(effects, tmp_path / "g.zarr")
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].pop("complete")
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"incomplete store.*collect the maps again"):
        open_group(store)


def test_opening_reads_no_map_data(tmp_path: Path) -> None:
    effects, _, _, _ = subject_maps(tmp_path / "maps", 2, with_variance=False)
    store = collect(effects, tmp_path / "g.zarr")
    for chunk in (store / "effect").rglob("*"):
        if chunk.is_file() and chunk.name != "zarr.json":
            chunk.write_bytes(b"damaged")
    ds = open_group(store)  # opens: no chunk is read
    with pytest.raises(StoreError, match="effect"):
        ds.effect.values.sum()


@pytest.mark.cluster
def test_collect_on_a_local_cluster_equals_collect_in_process(tmp_path: Path, local_client) -> None:
    effects, variances, _, _ = subject_maps(tmp_path / "maps", 7, shrink=True, seed=5)
    a = collect(effects, tmp_path / "a.zarr", variances=variances, chunks=(2, 64))
    b = collect(
        effects, tmp_path / "b.zarr", variances=variances, chunks=(2, 64), client=local_client
    )
    ga, gb = open_group(a), open_group(b)
    np.testing.assert_array_equal(ga.effect.values, gb.effect.values)
    np.testing.assert_array_equal(ga.variance.values, gb.variance.values)
    assert ga.attrs["sources"] == gb.attrs["sources"]


def test_glm_result_stores_give_the_same_store_as_their_nifti_maps(
    tmp_path: Path, functional_nii: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    mask = np.zeros((17, 21, 3), bool)
    mask[2:15, 3:18, :] = True
    run = bigglm.convert(functional_nii, tmp_path / "run.zarr", mask=mask)
    rng = np.random.default_rng(0)
    results, effects, variances = [], [], []
    for s in range(3):
        x = pd.DataFrame({"a": rng.normal(size=20), "b": rng.normal(size=20), "constant": 1.0})
        result = bigglm.fit(run, x)
        results.append(result.to_zarr(tmp_path / f"sub-0{s}_glm.zarr"))
        result.to_nifti(tmp_path / "maps", {"aMinusB": "a - b"}, prefix=f"sub-0{s}")
        stem = f"sub-0{s}_contrast-aMinusB_stat-"
        effects.append(tmp_path / "maps" / f"{stem}effect_statmap.nii.gz")
        variances.append(tmp_path / "maps" / f"{stem}variance_statmap.nii.gz")
    from_results = open_group(collect(results, tmp_path / "r.zarr", contrast="a - b"))
    from_maps = open_group(collect(effects, tmp_path / "m.zarr", variances=variances))
    assert from_results.subject.values.tolist() == ["sub-00", "sub-01", "sub-02"]
    np.testing.assert_array_equal(from_results["mask"].values, mask)
    np.testing.assert_array_equal(from_results.effect.values, from_maps.effect.values)
    np.testing.assert_array_equal(from_results.variance.values, from_maps.variance.values)
    assert from_results.attrs["sources"][0]["effect"]["contrast"] == "a - b"
    assert len(from_results.attrs["sources"][0]["effect"]["sha256"]) == 64
    with pytest.raises(DesignError, match="pass contrast="):
        collect(results, tmp_path / "x.zarr")
    # a result's contrast is computed once for its effect and variance (it was twice)
    calls = []
    original = bigglm.GLMResult.contrast

    def counted(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(bigglm.GLMResult, "contrast", counted)
    masked = open_group(collect(results, tmp_path / "k.zarr", contrast="a - b", mask=mask))
    assert len(calls) == len(results)
    np.testing.assert_array_equal(masked.variance.values, from_maps.variance.values)


def test_collect_leaves_zarr_configuration_as_it_found_it(tmp_path: Path) -> None:
    """Regression: collect once set zarr's global write_empty_chunks in each task's thread;
    contexts entered and left by concurrent threads left it True for the whole process."""
    import zarr

    before = zarr.config.get("array.write_empty_chunks")
    effects, variances, _, _ = subject_maps(tmp_path / "maps", 8, seed=9)
    collect(effects, tmp_path / "g.zarr", variances=variances, chunks=(1, 64))
    assert zarr.config.get("array.write_empty_chunks") == before
    nan_chunks = open_group(tmp_path / "g.zarr")  # every chunk file is there, NaN ones too
    assert nan_chunks.sizes["subject"] == 8
