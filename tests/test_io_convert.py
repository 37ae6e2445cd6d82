"""bigglm.convert on real and generated NIfTI files, checked against nibabel's own reading.

The reference for every stored value is nibabel's ``get_fdata()`` (float64, scaling applied)
of the same file, looked up at the store's ``(i, j, k)`` voxel indices.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel
import numpy as np
import pytest

import bigglm
from bigglm.io.store import BOLD_CODEC

#: nibabel's functional.nii has 3 slices: too thin for an EPI mask; give a box.
FUNCTIONAL_MASK = np.zeros((17, 21, 3), bool)
FUNCTIONAL_MASK[2:15, 3:19, :] = True


def _reference(path: Path | list[Path]) -> np.ndarray:
    """nibabel's reading of a 4D file or a list of 3D files, as (X, Y, Z, T) float64."""
    if isinstance(path, list):
        return np.stack([nibabel.load(p).get_fdata() for p in path], axis=-1)
    return nibabel.load(path).get_fdata()


def _stored_as_volume_series(store: Path) -> tuple[np.ndarray, np.ndarray]:
    """(bold values, reference-indexable voxel indices) from a store."""
    ds = bigglm.open_run(store)
    return ds.bold.values, np.stack([ds.i.values, ds.j.values, ds.k.values])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_functional_nii_int16_scaled_matches_nibabel(functional_nii: Path, tmp_path: Path) -> None:
    """Real int16 series with scl_slope/scl_inter: stored float32 values equal nibabel's."""
    assert nibabel.load(functional_nii).dataobj.slope != 1.0  # the file really is scaled
    store = bigglm.convert(
        functional_nii, tmp_path / "run.zarr", time_chunk=8, voxel_chunk=300, mask=FUNCTIONAL_MASK
    )
    bold, (i, j, k) = _stored_as_volume_series(store)
    expected = _reference(functional_nii)[i, j, k, :].T
    assert bold.dtype == np.float32
    # scaling is computed in float64 and rounded once: nibabel's values rounded to float32
    np.testing.assert_array_equal(bold, expected.astype(np.float32))


def test_example4d_gz_and_header_tr(example4d_niigz: Path, tmp_path: Path) -> None:
    """Real gzip series: values equal nibabel's; TR taken from the argument when given."""
    store = bigglm.convert(example4d_niigz, tmp_path / "run.zarr", tr=2.0)
    bold, (i, j, k) = _stored_as_volume_series(store)
    np.testing.assert_array_equal(bold, _reference(example4d_niigz)[i, j, k, :].T)
    ds = bigglm.open_run(store)
    assert ds.attrs["tr"] == 2.0
    np.testing.assert_array_equal(ds.time.values, [0.0, 2.0])


def test_store_layout_matches_contract(functional_nii: Path, tmp_path: Path) -> None:
    store = bigglm.convert(
        functional_nii, tmp_path / "run.zarr", time_chunk=8, voxel_chunk=256, mask=FUNCTIONAL_MASK
    )
    ds = bigglm.open_run(store)
    img = nibabel.load(functional_nii)
    assert ds.bold.dims == ("time", "voxel")
    assert ds.bold.data.chunks[0] == (8, 8, 4)
    assert set(ds.bold.data.chunks[1][:-1]) == {256}
    assert ds.mask.dims == ("x", "y", "z") and ds.mask.dtype == bool
    mask = ds.mask.values
    # i, j, k: the mask's True voxels in C order
    np.testing.assert_array_equal(np.stack([ds.i, ds.j, ds.k]), np.nonzero(mask))
    assert ds.i.dtype == np.int32
    np.testing.assert_allclose(ds.attrs["affine"], img.affine, rtol=0, atol=0)
    assert ds.attrs["volume_shape"] == [17, 21, 3]
    assert ds.attrs["tr"] == 2.0
    assert ds.attrs["units"]["time"] == "s" and ds.attrs["units"]["space"] == "mm"
    assert ds.time.attrs["units"] == "s"
    assert ds.attrs["version"] == bigglm.__version__
    assert ds.attrs["parameters"]["codec"] == BOLD_CODEC.to_dict()
    assert ds.attrs["store"] == str(store)
    [source] = ds.attrs["sources"]
    assert source == {
        "path": str(functional_nii.resolve()),
        "size": functional_nii.stat().st_size,
        "sha256": _sha256(functional_nii),
    }


def test_gz_provenance_hashes_the_compressed_file(example4d_niigz: Path, tmp_path: Path) -> None:
    store = bigglm.convert(example4d_niigz, tmp_path / "run.zarr", tr=2.0)
    [source] = bigglm.open_run(store).attrs["sources"]
    assert source["sha256"] == _sha256(example4d_niigz)
    assert source["size"] == example4d_niigz.stat().st_size


def test_list_of_3d_volumes_equals_the_4d_file(write_nifti, brain_series, tmp_path: Path) -> None:
    data = brain_series((9, 10, 7), 11, seed=1)
    four_d = write_nifti(data, "bold.nii.gz")
    volumes = [write_nifti(data[..., t], f"vol{t:03d}.nii") for t in range(data.shape[-1])]
    mask = write_nifti((data.mean(-1) > 500).astype(np.uint8), "mask.nii")
    a = bigglm.convert(four_d, tmp_path / "a.zarr", mask=mask, time_chunk=4)
    b = bigglm.convert(volumes, tmp_path / "b.zarr", mask=mask, tr=2.0, time_chunk=4)
    np.testing.assert_array_equal(bigglm.open_run(a).bold.values, bigglm.open_run(b).bold.values)
    np.testing.assert_array_equal(
        bigglm.open_run(a).bold.values, data[bigglm.open_run(a).mask.values].T
    )
    sources = bigglm.open_run(b).attrs["sources"]
    assert [s["sha256"] for s in sources] == [_sha256(p) for p in volumes]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_generated_int16_with_scaling(write_nifti, brain_series, suffix: str) -> None:
    data = brain_series((16, 16, 12), 13, seed=2) * 100.0  # beyond int16: nibabel must scale
    path = write_nifti(data, "bold" + suffix, dtype=np.int16)
    assert nibabel.load(path).dataobj.slope != 1.0
    store = bigglm.convert(path, path.parent / "run.zarr", time_chunk=5)
    bold, (i, j, k) = _stored_as_volume_series(store)
    np.testing.assert_array_equal(bold, _reference(path)[i, j, k, :].T.astype(np.float32))


@pytest.mark.parametrize(("unit", "pixdim", "seconds"), [("sec", 2.5, 2.5), ("msec", 800.0, 0.8)])
def test_tr_from_header_in_its_time_unit(
    write_nifti, brain_series, unit: str, pixdim: float, seconds: float
) -> None:
    path = write_nifti(brain_series((16, 16, 12), 5, seed=3), tr=pixdim, time_unit=unit)
    ds = bigglm.open_run(bigglm.convert(path, path.parent / "run.zarr"))
    assert ds.attrs["tr"] == pytest.approx(seconds)
    np.testing.assert_allclose(ds.time.values, np.arange(5) * seconds)
    assert ds.attrs["parameters"]["tr_from"] == "header"


def test_tr_argument_overrides_header(functional_nii: Path, tmp_path: Path) -> None:
    ds = bigglm.open_run(
        bigglm.convert(functional_nii, tmp_path / "run.zarr", tr=0.72, mask=FUNCTIONAL_MASK)
    )
    assert ds.attrs["tr"] == 0.72
    assert ds.attrs["parameters"]["tr_from"] == "argument"
    assert ds.time.values[-1] == pytest.approx(19 * 0.72)


def test_sources_are_never_modified(functional_nii: Path, example4d_niigz: Path, tmp_path) -> None:
    before = {p: (_sha256(p), p.stat().st_mtime_ns) for p in (functional_nii, example4d_niigz)}
    bigglm.convert(functional_nii, tmp_path / "a.zarr", mask=FUNCTIONAL_MASK)
    bigglm.convert(example4d_niigz, tmp_path / "b.zarr", tr=2.0)
    after = {p: (_sha256(p), p.stat().st_mtime_ns) for p in (functional_nii, example4d_niigz)}
    assert after == before


def test_progress_reports_volumes(functional_nii: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    mask = np.ones((17, 21, 3), np.uint8)
    mask_path = tmp_path / "mask.nii"
    nibabel.save(nibabel.Nifti1Image(mask, nibabel.load(functional_nii).affine), mask_path)
    bigglm.convert(
        functional_nii,
        tmp_path / "run.zarr",
        mask=mask_path,
        time_chunk=8,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(8, 20), (16, 20), (20, 20)]


def test_convert_many_sequential_validates_everything_first(
    write_nifti, brain_series, tmp_path: Path
) -> None:
    good = write_nifti(brain_series((16, 16, 12), 6, seed=4), "good.nii")
    bad = write_nifti(brain_series((16, 16, 12), 6, seed=5), "bad.nii", tr=0.0)
    with pytest.raises(bigglm.StoreError, match=r"bad\.nii: the header has no repetition time"):
        bigglm.convert_many([good, bad], [tmp_path / "a.zarr", tmp_path / "b.zarr"])
    assert not (tmp_path / "a.zarr").exists()  # the good run was not converted either
    with pytest.raises(bigglm.StoreError, match="same store"):
        bigglm.convert_many([good, good], [tmp_path / "a.zarr", tmp_path / "a.zarr"])
    with pytest.raises(bigglm.StoreError, match="2 runs but 1 stores"):
        bigglm.convert_many([good, good], [tmp_path / "a.zarr"])


@pytest.mark.cluster
def test_convert_many_on_a_local_cluster(write_nifti, brain_series, tmp_path: Path) -> None:
    """Runs converted in parallel by worker processes equal runs converted here."""
    from distributed import Client, LocalCluster

    runs = [
        write_nifti(brain_series((16, 16, 12), 7, seed=10 + n), f"run{n}.nii.gz") for n in range(3)
    ]
    stores = [tmp_path / f"run{n}.zarr" for n in range(3)]
    done: list[tuple[int, int]] = []
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        paths = bigglm.convert_many(
            runs, stores, client=client, time_chunk=3, progress=lambda d, t: done.append((d, t))
        )
        workers = set(client.run(lambda: 1))
    assert len(workers) == 2
    assert paths == [s.resolve() for s in stores]
    assert done == [(1, 3), (2, 3), (3, 3)]
    for run, store in zip(runs, stores, strict=True):
        local = bigglm.convert(run, tmp_path / f"local-{store.name}", time_chunk=3)
        remote, here = bigglm.open_run(store), bigglm.open_run(local)
        np.testing.assert_array_equal(remote.mask.values, here.mask.values)
        np.testing.assert_array_equal(remote.bold.values, here.bold.values)
        assert remote.attrs["sources"] == here.attrs["sources"]


#: Converts argv[1] to argv[2] (mask argv[3], .npy or "none") in a fresh interpreter with
#: small reading blocks and hasher allowance, and prints the peak of traced allocations.
_TRACED_CONVERSION = """
import sys, tracemalloc
import numpy as np
import bigglm
from bigglm.io import conversion, nifti

conversion.READ_BLOCK_BYTES = 256 * 1024
nifti._Sha256.MAX_PENDING_COPIES = 256 * 1024
mask = None if sys.argv[3] == "none" else np.load(sys.argv[3])
tracemalloc.start()
bigglm.convert(sys.argv[1], sys.argv[2], mask=mask, time_chunk=8)
print(tracemalloc.get_traced_memory()[1])
"""


@pytest.mark.parametrize(("suffix", "with_mask"), [(".nii", True), (".nii.gz", False)])
def test_memory_does_not_grow_with_series_length(
    write_nifti, brain_series, suffix: str, with_mask: bool
) -> None:
    """Streaming: the peak of traced allocations is flat in the number of volumes.

    Reading blocks are made small (256 KiB) so that a 4x longer series would show up as a
    4x larger peak if anything held the series; numpy's allocations are traced. So is the
    hasher's allowance of compressed bytes waiting for it (64 MiB, more than these whole
    files), which a hasher falling behind would fill. Each conversion runs in a fresh
    interpreter: tracemalloc counts every thread's allocations in its process, and in the
    full test run (not alone) the longer series' peak came out 2.2 times the shorter's
    in the test process, threads left by earlier tests being the likely cause (a
    LocalCluster's scheduler runs in the test process).
    """
    import subprocess
    import sys

    peaks = {}
    for n_volumes in (100, 400):
        data = brain_series((32, 32, 24), n_volumes, seed=n_volumes)
        path = write_nifti(data, f"bold{n_volumes}{suffix}")
        mask = "none"
        if with_mask:
            mask = str(path.parent / f"mask{n_volumes}.npy")
            np.save(mask, data.mean(axis=-1) > 500)
        del data
        target = path.parent / f"run{n_volumes}.zarr"
        done = subprocess.run(
            [sys.executable, "-c", _TRACED_CONVERSION, str(path), str(target), mask],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        peaks[n_volumes] = int(done.stdout.split()[-1])
        assert bigglm.open_run(target).sizes["time"] == n_volumes
    series_bytes = 32 * 32 * 24 * 400 * 4
    assert peaks[400] < 1.25 * peaks[100], peaks
    assert peaks[400] < series_bytes / 4, (peaks, series_bytes)


@pytest.mark.parametrize(
    ("dtype", "nifti2"),
    [(">f4", False), (">i2", False), ("<f8", False), ("<u1", False), ("<f4", True)],
)
def test_byte_orders_types_and_nifti2(
    brain_series, tmp_path: Path, dtype: str, nifti2: bool
) -> None:
    """Big-endian, float64, uint8 and NIfTI-2 files give nibabel's values as float32."""
    data = brain_series((16, 16, 12), 5, seed=6) / (8.0 if dtype == "<u1" else 1.0)
    kind = nibabel.Nifti2Image if nifti2 else nibabel.Nifti1Image
    header = (nibabel.Nifti2Header if nifti2 else nibabel.Nifti1Header)(endianness=dtype[0])
    img = kind(data, np.diag([2.0, 2.0, 2.0, 1.0]), header=header)
    img.set_data_dtype(np.dtype(dtype))
    img.header["pixdim"][4] = 2.0
    path = tmp_path / "bold.nii.gz"
    nibabel.save(img, path)
    loaded = nibabel.load(path)
    assert loaded.header.endianness == dtype[0] and isinstance(loaded, kind)
    store = bigglm.convert(path, tmp_path / "run.zarr", time_chunk=2)
    bold, (i, j, k) = _stored_as_volume_series(store)
    np.testing.assert_array_equal(bold, loaded.get_fdata()[i, j, k, :].T.astype(np.float32))


def test_complex_voxels_are_refused(tmp_path: Path) -> None:
    data = np.ones((4, 4, 4, 3), np.complex64)
    path = tmp_path / "complex.nii"
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(bigglm.StoreError, match=r"complex\.nii: voxels of type complex64"):
        bigglm.convert(path, tmp_path / "run.zarr", tr=1.0)


def test_gz_volumes_with_computed_mask_equal_the_4d_nii(
    write_nifti, brain_series, tmp_path: Path
) -> None:
    """Two passes over compressed 3D volumes (no mask) equal two over one 4D .nii."""
    data = brain_series((16, 16, 12), 9, seed=8)
    four_d = write_nifti(data, "bold.nii")
    volumes = [write_nifti(data[..., t], f"vol{t}.nii.gz") for t in range(9)]
    a = bigglm.open_run(bigglm.convert(four_d, tmp_path / "a.zarr", time_chunk=4))
    b = bigglm.open_run(bigglm.convert(volumes, tmp_path / "b.zarr", tr=2.0, time_chunk=4))
    np.testing.assert_array_equal(a.mask.values, b.mask.values)
    np.testing.assert_array_equal(a.bold.values, b.bold.values)
    np.testing.assert_array_equal(a.bold.values, data[a.mask.values].T)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_source_changed_between_passes_is_refused(
    write_nifti, brain_series, tmp_path: Path
) -> None:
    """With no mask the source is read twice; a file rewritten in between is caught."""
    data = brain_series((16, 16, 12), 6, seed=9)
    path = write_nifti(data, "bold.nii.gz")
    other = write_nifti(data[..., ::-1].copy(), "other.nii.gz")

    def rewrite_after_first_pass(done: int, total: int) -> None:
        if done == total // 2:
            path.write_bytes(other.read_bytes())

    with pytest.raises(bigglm.StoreError, match=r"bold\.nii\.gz: changed while it was converted"):
        bigglm.convert(path, tmp_path / "run.zarr", progress=rewrite_after_first_pass)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bold.nii.gz", "other.nii.gz"]
