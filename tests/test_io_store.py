"""Stores: lazy opening, completion flag, atomic commit and overwrite, and to_nifti round trips."""

from __future__ import annotations

from pathlib import Path

import dask
import nibabel
import numpy as np
import pytest
import xarray as xr
import zarr
from dask.callbacks import Callback
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from zarr.storage import LocalStore, WrapperStore

import bigglm
from bigglm.exceptions import StoreError

#: nibabel's functional.nii has 3 slices: too thin for an EPI mask; give a box.
FUNCTIONAL_MASK = np.zeros((17, 21, 3), bool)
FUNCTIONAL_MASK[2:15, 3:19, :] = True


class _KeyRecordingStore(WrapperStore[LocalStore]):
    """A real on-disk store that records every key read through it."""

    def __init__(self, store: LocalStore) -> None:
        super().__init__(store)
        self.keys: list[str] = []

    async def get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def]
        self.keys.append(key)
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):  # type: ignore[no-untyped-def]
        self.keys.extend(key for key, _ in key_ranges)
        return await super().get_partial_values(prototype, key_ranges)


class _CountComputes(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.tasks = 0

    def _start_state(self, dsk, state) -> None:  # type: ignore[no-untyped-def]
        self.tasks += len(state["ready"]) + len(state["waiting"])


@pytest.fixture
def store(functional_nii: Path, tmp_path: Path) -> Path:
    return bigglm.convert(
        functional_nii, tmp_path / "run.zarr", time_chunk=8, voxel_chunk=256, mask=FUNCTIONAL_MASK
    )


def test_open_run_reads_no_voxel_data(store: Path) -> None:
    recording = _KeyRecordingStore(LocalStore(store, read_only=True))
    # the local synchronous scheduler, whatever client another test left as default, so
    # that the callback sees any computation
    with dask.config.set(scheduler="sync"), _CountComputes() as counter:
        ds = bigglm.open_run(recording)
    assert counter.tasks == 0
    assert isinstance(ds.bold.data, dask.array.Array)
    assert ds.bold.data.chunks[0] == (8, 8, 4)
    assert not [key for key in recording.keys if key.startswith(("bold/c", "mask/c"))]
    # positive controls: computing does run tasks and read chunks through the same wrapper
    with dask.config.set(scheduler="sync"), _CountComputes() as counter:
        ds.bold.sum().compute()
    assert counter.tasks > 0
    assert [key for key in recording.keys if key.startswith("bold/c")]


def test_incomplete_store_is_refused(store: Path) -> None:
    group = zarr.open_group(store, mode="r+")
    del group.attrs["complete"]
    with pytest.raises(StoreError, match="incomplete store"):
        bigglm.open_run(store)


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a bigglm store"):
        bigglm.open_run(tmp_path)


def test_existing_store_is_refused_without_overwrite(store: Path, functional_nii: Path) -> None:
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    with pytest.raises(StoreError, match=r"already exists.*overwrite=True"):
        bigglm.convert(functional_nii, store, mask=FUNCTIONAL_MASK)
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_overwrite_replaces_the_store(store: Path, functional_nii: Path) -> None:
    bigglm.convert(functional_nii, store, overwrite=True, tr=3.0, mask=FUNCTIONAL_MASK)
    assert bigglm.open_run(store).attrs["tr"] == 3.0
    assert [p.name for p in store.parent.iterdir()] == [store.name]  # no leftovers


def test_overwrite_never_replaces_a_non_store(functional_nii: Path, tmp_path: Path) -> None:
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "keep.txt").write_text("do not delete")
    with pytest.raises(StoreError, match="not a Zarr store"):
        bigglm.convert(functional_nii, precious, overwrite=True, mask=FUNCTIONAL_MASK)
    assert (precious / "keep.txt").read_text() == "do not delete"


def test_failed_conversion_leaves_nothing(
    functional_nii: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure in the middle of writing (here: the disk 'fills up') leaves no store."""
    from bigglm.io import store as store_module

    def full_disk(self, start, rows):  # type: ignore[no-untyped-def]
        if start > 0:
            raise OSError(28, "No space left on device")
        self.bold[start : start + rows.shape[0], :] = rows

    monkeypatch.setattr(store_module.StoreWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        bigglm.convert(functional_nii, tmp_path / "run.zarr", time_chunk=8, mask=FUNCTIONAL_MASK)
    assert list(tmp_path.iterdir()) == []


def test_to_nifti_map_and_series(store: Path, functional_nii: Path, tmp_path: Path) -> None:
    ds = bigglm.open_run(store)
    reference = nibabel.load(functional_nii)
    series = bigglm.to_nifti(ds.bold, store, tmp_path / "series.nii.gz")
    img = nibabel.load(series)
    assert img.shape == reference.shape
    np.testing.assert_allclose(img.affine, reference.affine, rtol=0, atol=0)
    assert img.header.get_zooms()[3] == 2.0
    expected = reference.get_fdata().astype(np.float32)
    mask = ds.mask.values
    np.testing.assert_array_equal(img.get_fdata()[mask], expected[mask])
    assert np.isnan(img.get_fdata()[~mask]).all()
    mean = bigglm.to_nifti(ds.bold.mean("time"), ds, tmp_path / "mean.nii", fill=0.0)
    mean_img = nibabel.load(mean)
    assert mean_img.shape == reference.shape[:3]
    np.testing.assert_allclose(mean_img.get_fdata()[mask], expected[mask].mean(axis=-1), rtol=1e-6)
    assert (mean_img.get_fdata()[~mask] == 0).all()


def test_to_nifti_rejects_wrong_length(store: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="voxels"):
        bigglm.to_nifti(np.zeros(5), store, tmp_path / "x.nii")
    assert not list(tmp_path.glob("*.nii"))


def test_to_nifti_bool_and_int_maps(store: Path, tmp_path: Path) -> None:
    ds = bigglm.open_run(store)
    n = ds.sizes["voxel"]
    flags = bigglm.to_nifti(np.arange(n) % 2 == 0, ds, tmp_path / "flags.nii")
    labels = bigglm.to_nifti(np.arange(n, dtype=np.int16), ds, tmp_path / "labels.nii")
    assert nibabel.load(flags).get_data_dtype() == np.uint8
    assert nibabel.load(labels).get_data_dtype() == np.int16
    mask = ds.mask.values
    np.testing.assert_array_equal(np.asarray(nibabel.load(labels).dataobj)[mask], np.arange(n))
    assert (np.asarray(nibabel.load(labels).dataobj)[~mask] == 0).all()


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*(st.integers(1, 6),) * 3),
    n_volumes=st.integers(1, 7),
    seed=st.integers(0, 2**32 - 1),
    gz=st.booleans(),
    chunks=st.tuples(st.integers(1, 4), st.integers(1, 50)),
    data=st.data(),
)
def test_round_trip_is_exact_for_float32(
    tmp_path_factory: pytest.TempPathFactory,
    shape: tuple[int, int, int],
    n_volumes: int,
    seed: int,
    gz: bool,
    chunks: tuple[int, int],
    data: st.DataObject,
) -> None:
    """NIfTI -> store -> NIfTI gives back every in-mask float32 value bit for bit."""
    tmp = tmp_path_factory.mktemp("roundtrip")
    rng = np.random.default_rng(seed)
    values = data.draw(
        arrays(
            np.float32,
            (*shape, n_volumes),
            elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
        )
    )
    mask = rng.random(shape) < 0.6
    mask.flat[rng.integers(mask.size)] = True
    affine = np.diag([*rng.uniform(0.5, 4.0, 3), 1.0])
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    suffix = ".nii.gz" if gz else ".nii"
    source = tmp / f"bold{suffix}"
    img = nibabel.Nifti1Image(values, affine)
    img.header["pixdim"][4] = 1.25
    nibabel.save(img, source)
    nibabel.save(nibabel.Nifti1Image(mask.astype(np.uint8), affine), tmp / "mask.nii")
    store = bigglm.convert(
        source, tmp / "run.zarr", mask=tmp / "mask.nii", time_chunk=chunks[0], voxel_chunk=chunks[1]
    )
    out = bigglm.to_nifti(bigglm.open_run(store).bold, store, tmp / f"back{suffix}")
    back = nibabel.load(out)
    assert back.shape == (*shape, n_volumes)
    assert back.get_data_dtype() == np.float32
    np.testing.assert_array_equal(back.affine, nibabel.load(source).affine)
    got = np.asarray(back.dataobj)
    np.testing.assert_array_equal(got[mask], values[mask])
    assert np.isnan(got[~mask]).all()


def test_open_run_dataset_is_xarray(store: Path) -> None:
    ds = bigglm.open_run(store)
    assert isinstance(ds, xr.Dataset)
    assert set(ds.coords) >= {"time", "voxel", "i", "j", "k"}
    assert ds.attrs["volume_shape"] == list(ds.mask.shape)


def test_graph_references_the_store_not_the_data(store: Path) -> None:
    """Workers read chunks themselves: the pickled graph is tiny next to the data."""
    import pickle

    ds = bigglm.open_run(store)
    graph = pickle.dumps(dict(ds.bold.data.__dask_graph__()))
    assert len(graph) < ds.bold.nbytes / 4
    assert str(store) in str(ds.bold.data.__dask_graph__().values())


def test_killed_conversion_leaves_no_complete_store(
    write_nifti, brain_series, tmp_path: Path
) -> None:
    """SIGKILL in the middle of writing: nothing at the target, the leftover never opens."""
    import os
    import signal
    import subprocess
    import sys
    import time

    source = write_nifti(brain_series((40, 40, 30), 300, seed=0), "bold.nii")
    target = tmp_path / "run.zarr"
    code = (
        "import bigglm, sys; "
        "bigglm.convert(sys.argv[1], sys.argv[2], mask=None, time_chunk=2, voxel_chunk=64)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(source), str(target)])
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".run.zarr.partial-*/bold/c/1/*")):
            assert proc.poll() is None, "conversion finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not target.exists()
    [partial] = tmp_path.glob(".run.zarr.partial-*")
    with pytest.raises(StoreError, match="incomplete store"):
        bigglm.open_run(partial)


def test_to_nifti_accepts_voxel_first_dataarrays(store: Path, tmp_path: Path) -> None:
    ds = bigglm.open_run(store)
    a = bigglm.to_nifti(ds.bold, ds, tmp_path / "a.nii")
    b = bigglm.to_nifti(ds.bold.transpose("voxel", "time"), ds, tmp_path / "b.nii")
    np.testing.assert_array_equal(nibabel.load(a).get_fdata(), nibabel.load(b).get_fdata())
    assert nibabel.load(b).header.get_zooms()[3] == ds.attrs["tr"]
