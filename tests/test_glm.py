"""bigglm.fit and GLMResult: laziness, one read per chunk, chunking invariance,
validation, progress, several runs, and the Zarr and NIfTI outputs."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import dask
import dask.array as da
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import bigglm
from bigglm.exceptions import DesignError, StoreError

pytestmark = pytest.mark.usefixtures("threads_scheduler")


def make_data(n_scans: int = 60, n_vox: int = 30, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n_scans)
    design = pd.DataFrame(
        {
            "faces": (t // 6 % 2 == 0).astype(float),
            "houses": (t // 9 % 2 == 0).astype(float),
            "constant": 1.0,
        }
    )
    noise = rng.normal(size=(n_scans, n_vox))
    noise[1:] += 0.4 * noise[:-1]
    y = 500 + design.to_numpy() @ rng.normal(size=(3, n_vox)) + noise
    return design, y.astype(np.float32)


class CountingArray:
    """An array that counts the reads of each chunk (by the slice's start)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.reads: Counter[tuple[int, int]] = Counter()
        self._lock = threading.Lock()

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        out = self.data[key]
        if out.size:
            with self._lock:
                self.reads[(key[0].start or 0, key[1].start or 0)] += 1
        return out


def counted_run(y: np.ndarray, chunks: tuple[int, int]) -> tuple[xr.Dataset, CountingArray]:
    source = CountingArray(y)
    bold = da.from_array(source, chunks=chunks, asarray=False)
    return xr.Dataset({"bold": (("time", "voxel"), bold)}), source


@pytest.mark.parametrize("noise", ["ols", "ar1", "ar3"])
def test_fit_is_lazy_and_reads_each_chunk_exactly_once(noise: str) -> None:
    design, y = make_data()
    ds, source = counted_run(y, (16, 8))
    result = bigglm.fit(ds, design, noise=noise)
    assert sum(source.reads.values()) == 0  # building the fit reads nothing
    result.compute()
    n_chunks = len(ds["bold"].data.chunks[0]) * len(ds["bold"].data.chunks[1])
    assert len(source.reads) == n_chunks and set(source.reads.values()) == {1}
    for expression in ("faces", "houses", "faces - houses"):
        result.contrast(expression)  # contrasts never touch the data again
    result.contrast(["faces", "houses"], kind="F")
    assert result.beta.chunks is None  # the views now show the computed statistics
    _ = result.sigma2.values, result.beta.values
    assert set(source.reads.values()) == {1}


def test_design_enters_the_graph_once() -> None:
    design, y = make_data()
    ds = xr.Dataset({"bold": (("time", "voxel"), y)}).chunk({"time": 10, "voxel": 7})
    result = bigglm.fit(ds, design, noise="ar1")
    graph = result.beta.data.__dask_graph__()
    names = Counter(str(k[0] if isinstance(k, tuple) else k).rsplit("-", 1)[0] for k in graph)
    assert names["DesignTerms"] == 1
    assert names["chunk_statistics"] == 6 * 5


@pytest.mark.parametrize("noise", ["ols", "ar1", "ar2"])
def test_results_do_not_depend_on_chunking(noise: str) -> None:
    """1e-12: only the order of float64 sums changes with the chunking."""
    design, y = make_data(n_scans=73, n_vox=23)
    outputs = []
    for chunks in [(73, 23), (10, 23), (7, 5), (30, 1), (2, 11)]:
        ds = xr.Dataset({"bold": (("time", "voxel"), y)}).chunk(
            {"time": chunks[0], "voxel": chunks[1]}
        )
        result = bigglm.fit(ds, design, noise=noise, split_every=3)
        outputs.append((result.compute(), result.contrast("faces - houses")))
    reference, ref_con = outputs[0]
    for result, con in outputs[1:]:
        np.testing.assert_allclose(result.beta.values, reference.beta.values, rtol=1e-12)
        np.testing.assert_allclose(result.sigma2.values, reference.sigma2.values, rtol=1e-12)
        np.testing.assert_allclose(con["z"].values, ref_con["z"].values, rtol=1e-12)
        if noise != "ols":
            np.testing.assert_allclose(result.ar.values, reference.ar.values, rtol=1e-12)


@pytest.mark.parametrize("noise", ["ols", "ar2"])
def test_statistics_budget_splits_voxel_blocks_without_rereading(
    noise: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A design with many columns gets narrower voxel blocks (bounded task memory); each
    store chunk is still read once and the numbers do not change (1e-12)."""
    from bigglm.glm import engine

    design, y = make_data(n_scans=50, n_vox=24)
    reference = bigglm.fit(xr.Dataset({"bold": (("time", "voxel"), y)}), design, noise=noise)
    order = 0 if noise == "ols" else 2
    rows = (order + 1) * design.shape[1] + 3 * order + 1
    monkeypatch.setattr(engine, "STATS_BUDGET", 8 * rows * 5)  # at most 5 voxels a block
    ds, source = counted_run(y, (20, 12))
    result = bigglm.fit(ds, design, noise=noise)
    graph = result.beta.data.__dask_graph__()
    names = Counter(str(k[0] if isinstance(k, tuple) else k).rsplit("-", 1)[0] for k in graph)
    assert names["chunk_statistics"] == 3 * 6  # 3 time blocks x (12 -> 4 + 4 + 4) x 2
    result.compute()
    assert len(source.reads) == 3 * 2 and set(source.reads.values()) == {1}
    np.testing.assert_allclose(result.beta.values, reference.compute().beta.values, rtol=1e-12)
    np.testing.assert_allclose(
        result.contrast("faces - houses")["z"].values,
        reference.contrast("faces - houses")["z"].values,
        rtol=1e-12,
    )


def test_time_chunks_shorter_than_the_ar_order_are_merged() -> None:
    design, y = make_data(n_scans=41)
    ds = xr.Dataset({"bold": (("time", "voxel"), y)}).chunk({"time": (1, 2, 30, 1, 7)})
    whole = xr.Dataset({"bold": (("time", "voxel"), y)})
    a = bigglm.fit(ds, design, noise="ar3").compute()
    b = bigglm.fit(whole, design, noise="ar3").compute()
    np.testing.assert_allclose(a.beta.values, b.beta.values, rtol=1e-12)


def test_validation_errors_say_what_to_fix() -> None:
    design, y = make_data()
    ds = xr.Dataset({"bold": (("time", "voxel"), y)})
    with pytest.raises(DesignError, match="has 59 rows but run 0 has 60 volumes"):
        bigglm.fit(ds, design.iloc[:-1])
    with pytest.raises(DesignError, match="noise='ar' is not understood"):
        bigglm.fit(ds, design, noise="ar")
    with pytest.raises(DesignError, match="2 runs but 1 designs"):
        bigglm.fit([ds, ds], [design])
    with pytest.raises(DesignError, match="run 1 has other voxels than run 0"):
        bigglm.fit([ds, ds.isel(voxel=slice(0, 5))], [design, design])
    with pytest.raises(DesignError, match=r"\['faces'\] contain NaN"):
        bigglm.fit(ds, design.assign(faces=np.nan))
    with pytest.raises(AttributeError, match="no AR coefficients"):
        _ = bigglm.fit(ds, design).ar


def test_progress_reports_every_voxel_block() -> None:
    design, y = make_data()
    ds = xr.Dataset({"bold": (("time", "voxel"), y)}).chunk({"time": 20, "voxel": 8})
    calls: list[tuple[int, int]] = []
    bigglm.fit(ds, design).compute(progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 4) for i in range(1, 5)]


def test_several_runs_combine_as_the_mean_of_run_contrasts() -> None:
    design_a, y_a = make_data(seed=1)
    design_b, y_b = make_data(n_scans=50, seed=2)
    design_b = design_b[["houses", "faces", "constant"]]  # other column order
    runs = [xr.Dataset({"bold": (("time", "voxel"), y)}) for y in (y_a, y_b)]
    result = bigglm.fit(runs, [design_a, design_b], noise="ar1")
    both = result.contrast("faces - houses")
    single = [
        bigglm.fit(r, d, noise="ar1").contrast("faces - houses")
        for r, d in zip(runs, [design_a, design_b], strict=True)
    ]
    np.testing.assert_allclose(
        both["effect"], (single[0]["effect"] + single[1]["effect"]) / 2, rtol=1e-12
    )
    np.testing.assert_allclose(
        both["variance"], (single[0]["variance"] + single[1]["variance"]) / 4, rtol=1e-12
    )
    assert float(both["dof"]) == float(single[0]["dof"]) + float(single[1]["dof"])
    weighted = result.contrast("faces - houses", precision_weighted=True)
    w = [1 / s["variance"] for s in single]
    np.testing.assert_allclose(
        weighted["effect"],
        (w[0] * single[0]["effect"] + w[1] * single[1]["effect"]) / (w[0] + w[1]),
        rtol=1e-10,
    )
    assert result.beta.dims == ("run", "regressor", "voxel")


def test_several_contrasts_at_once() -> None:
    design, y = make_data()
    result = bigglm.fit(xr.Dataset({"bold": (("time", "voxel"), y)}), design)
    many = result.contrast({"f": "faces", "fh": "faces - houses"})
    assert many["stat"].dims == ("contrast", "voxel")
    np.testing.assert_array_equal(
        many["stat"].sel(contrast="fh"), result.contrast("faces - houses")["stat"]
    )


def test_zarr_round_trip_keeps_every_contrast(tmp_path: Path) -> None:
    design, y = make_data()
    runs = [
        xr.Dataset({"bold": (("time", "voxel"), y)}),
        xr.Dataset({"bold": (("time", "voxel"), y[::-1].copy())}),
    ]
    for n_runs in (1, 2):
        result = bigglm.fit(runs[:n_runs], [design] * n_runs, noise="ar2")
        path = result.to_zarr(tmp_path / f"fit{n_runs}.zarr")
        with pytest.raises(StoreError, match="exists"):
            result.to_zarr(path)
        loaded = bigglm.GLMResult.from_zarr(path)
        assert loaded.runs[0].attrs["noise"] == "ar2"
        for spec, kind in (("faces - houses", "t"), (["faces", "houses"], "F")):
            a, b = result.contrast(spec, kind=kind), loaded.contrast(spec, kind=kind)  # type: ignore[arg-type]
            np.testing.assert_array_equal(a["z"].values, b["z"].values)
    result.to_zarr(tmp_path / "fit2.zarr", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_the_same_run_given_twice_is_refused(tmp_path: Path) -> None:
    """Fitting a run twice would double its degrees of freedom (z x 1.42 for one run)."""
    design, y = make_data(n_vox=4 * 3 * 2)
    img = nib.Nifti1Image(y.T.reshape(4, 3, 2, -1), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_zooms((2.0, 2.0, 2.0, 2.0))
    nib.save(img, tmp_path / "bold.nii.gz")
    store = bigglm.convert(
        tmp_path / "bold.nii.gz", tmp_path / "bold.zarr", mask=np.ones((4, 3, 2), bool)
    )
    ds = xr.Dataset({"bold": (("time", "voxel"), y)})
    twice = {
        "path": [store, str(store)],
        "opened": [bigglm.open_run(store), bigglm.open_run(store)],
        "path and opened": [str(store), bigglm.open_run(store)],
        "object": [ds, ds],
        # the same scans under another path: they were fitted as two runs (z x 1.42)
        "copy": [store, shutil.copytree(store, tmp_path / "copy.zarr")],
        "converted again": [
            store,
            bigglm.convert(
                tmp_path / "bold.nii.gz", tmp_path / "again.zarr", mask=np.ones((4, 3, 2), bool)
            ),
        ],
    }
    for runs in twice.values():
        with pytest.raises(DesignError, match=r"runs 0 and 1 are the same .*give each run once"):
            bigglm.fit(runs, [design, design])
    other = xr.Dataset({"bold": (("time", "voxel"), y + 1)})
    bigglm.fit([ds, other], [design, design])  # two distinct in-memory runs are fine


def test_result_store_chunks_carry_checksums(tmp_path: Path) -> None:
    import zarr
    from zarr.codecs import Crc32cCodec

    design, y = make_data()
    result = bigglm.fit(xr.Dataset({"bold": (("time", "voxel"), y)}), design, noise="ar1")
    path = result.to_zarr(tmp_path / "fit.zarr")
    root = zarr.open_group(path, mode="r")
    names = list(root.array_keys())
    assert "beta" in names
    for name in names:
        assert isinstance(root[name].compressors[-1], Crc32cCodec), name  # type: ignore[union-attr]
    # written again from what was read: still one checksum, last
    again = bigglm.GLMResult.from_zarr(path).to_zarr(tmp_path / "again.zarr")
    compressors = zarr.open_group(again, mode="r")["beta"].compressors  # type: ignore[union-attr]
    assert [type(c) for c in compressors].count(Crc32cCodec) == 1
    beta = next(p for p in sorted((path / "beta").rglob("*")) if p.is_file())
    data = bytearray(beta.read_bytes())
    data[len(data) // 2] ^= 0x01
    beta.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"fit\.zarr: a chunk of the result store is damaged"):
        bigglm.GLMResult.from_zarr(path)


def test_incomplete_result_store_is_refused(tmp_path: Path) -> None:
    xr.Dataset({"beta": ("voxel", np.ones(3))}).to_zarr(tmp_path / "half.zarr", consolidated=False)
    with pytest.raises(StoreError, match="not a complete bigglm result"):
        bigglm.GLMResult.from_zarr(tmp_path / "half.zarr")


def test_nifti_maps_with_bids_names_from_a_store(tmp_path: Path) -> None:
    design, y = make_data(n_vox=4 * 3 * 2)
    data = y.T.reshape(4, 3, 2, -1)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_zooms((2.0, 2.0, 2.0, 2.0))
    nib.save(img, tmp_path / "bold.nii.gz")
    store = bigglm.convert(
        tmp_path / "bold.nii.gz", tmp_path / "bold.zarr", mask=np.ones((4, 3, 2), bool)
    )
    result = bigglm.fit(store, design, noise="ar1")
    written = result.to_nifti(
        tmp_path / "out", {"faces - houses": "faces - houses"}, prefix="sub-01_task-x"
    )
    names = sorted(p.name for p in written)
    assert names == sorted(
        f"sub-01_task-x_contrast-facesMinusHouses_stat-{s}_statmap.nii.gz"
        for s in ("effect", "variance", "t", "p", "z")
    )
    z = np.asarray(nib.load(tmp_path / "out" / names[-1]).get_fdata())
    expected = result.contrast("faces - houses")["z"].values
    ds = bigglm.open_run(store)
    np.testing.assert_allclose(
        z[ds["i"].values, ds["j"].values, ds["k"].values], expected, rtol=1e-6
    )
    reloaded = bigglm.GLMResult.from_zarr(result.to_zarr(tmp_path / "glm.zarr"))
    again = reloaded.to_nifti(tmp_path / "again", "faces - houses", prefix="sub-01_task-x")
    np.testing.assert_array_equal(np.asarray(nib.load(again[-1]).get_fdata()), z)
    f_files = result.to_nifti(
        tmp_path / "out", {"any": ["faces", "houses"]}, prefix="sub-01", kind="F"
    )
    assert {p.name.split("_stat-")[1] for p in f_files} == {
        f"{s}_statmap.nii.gz" for s in ("effect", "variance", "F", "p", "z")
    }
    f_maps = result.contrast(["faces", "houses"], kind="F")
    by_stat = {p.name.split("_stat-")[1].split("_")[0]: p for p in f_files}
    ijk = (ds["i"].values, ds["j"].values, ds["k"].values)
    effect = np.asarray(nib.load(by_stat["effect"]).get_fdata())[ijk]  # (voxel, row)
    variance = np.asarray(nib.load(by_stat["variance"]).get_fdata())[ijk]
    np.testing.assert_allclose(effect.T, f_maps["effect"].values, rtol=1e-6)
    for row in (0, 1):
        np.testing.assert_allclose(variance[:, row], f_maps["variance"].values[row, row], rtol=1e-6)


def _store_fit(tmp_path: Path) -> bigglm.GLMResult:
    design, y = make_data(n_vox=2 * 3 * 2)
    nib.save(nib.Nifti1Image(y.T.reshape(2, 3, 2, -1), np.eye(4)), tmp_path / "bold.nii")
    store = bigglm.convert(
        tmp_path / "bold.nii", tmp_path / "bold.zarr", mask=np.ones((2, 3, 2), bool)
    )
    return bigglm.fit(store, design, noise="ols")


def test_to_nifti_writes_a_weights_dict_as_one_contrast(tmp_path: Path) -> None:
    result = _store_fit(tmp_path)
    written = result.to_nifti(tmp_path / "out", {"faces": 1, "houses": -1}, prefix="sub-01")
    assert sorted(p.name for p in written) == sorted(
        f"sub-01_contrast-facesMinusHouses_stat-{s}_statmap.nii.gz"
        for s in ("effect", "variance", "t", "p", "z")
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)
    z = np.asarray(nib.load(written[-1]).get_fdata()).reshape(-1)
    np.testing.assert_allclose(z, result.contrast("faces - houses")["z"].values, rtol=1e-6)


def _bids_store(folder: Path, name: str, seed: int = 0) -> tuple[Path, pd.DataFrame]:
    """A NIfTI run called ``name`` converted with bigglm.convert, and its design."""
    design, y = make_data(n_vox=2 * 3 * 2, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(y.T.reshape(2, 3, 2, -1), np.eye(4)), folder / name)
    store = bigglm.convert(
        folder / name, folder / f"{seed}.zarr", mask=np.ones((2, 3, 2), bool), tr=2.0
    )
    return store, design


def _entities(paths: list[Path]) -> set[str]:
    return {p.name.split("_contrast-")[0] for p in paths}


def test_to_nifti_names_maps_by_the_bids_entities_of_the_converted_source(
    tmp_path: Path,
) -> None:
    one, design = _bids_store(tmp_path / "raw", "sub-01_ses-2_task-faces_run-1_bold.nii.gz")
    two, _ = _bids_store(tmp_path / "raw", "sub-01_ses-2_task-faces_run-2_bold.nii.gz", seed=1)
    single = bigglm.fit(one, design, noise="ols")
    written = single.to_nifti(tmp_path / "single", "faces - houses")
    assert sorted(p.name for p in written) == sorted(
        f"sub-01_ses-2_task-faces_run-1_contrast-facesMinusHouses_stat-{s}_statmap.nii.gz"
        for s in ("effect", "variance", "t", "p", "z")
    )
    # the same maps as with the prefix given
    given = single.to_nifti(
        tmp_path / "given", "faces - houses", prefix="sub-01_ses-2_task-faces_run-1"
    )
    assert [p.name for p in given] == [p.name for p in written]
    np.testing.assert_array_equal(
        nib.load(given[-1]).get_fdata(), nib.load(written[-1]).get_fdata()
    )

    both = bigglm.fit([one, two], [design, design], noise="ols").compute()
    for result in (both, bigglm.GLMResult.from_zarr(both.to_zarr(tmp_path / "glm.zarr"))):
        f_maps = result.to_nifti(
            tmp_path / "both", {"any": ["faces", "houses"]}, kind="F", overwrite=True
        )
        assert _entities(f_maps) == {"sub-01_ses-2_task-faces"}  # shared, without run
        assert {p.name.split("_stat-")[1] for p in f_maps} == {
            f"{s}_statmap.nii.gz" for s in ("effect", "variance", "F", "p", "z")
        }
    named = both.to_nifti(tmp_path / "named", "faces", prefix="sub-01_task-faces")
    assert _entities(named) == {"sub-01_task-faces"}  # a prefix given is used as given


def test_to_nifti_without_a_prefix_needs_a_bids_named_source(tmp_path: Path) -> None:
    result = _store_fit(tmp_path)  # converted from bold.nii
    with pytest.raises(TypeError, match=r"needs prefix=.*\(bold\.nii\) are not BIDS-named"):
        result.to_nifti(tmp_path / "out", "faces - houses")
    design, y = make_data(n_vox=4)
    in_memory = bigglm.fit(xr.Dataset({"bold": (("time", "voxel"), y)}), design)
    with pytest.raises(TypeError, match=r"\(none recorded\)"):
        in_memory.to_nifti(tmp_path / "out", "faces - houses")
    assert not list(tmp_path.glob("**/*statmap*"))


@pytest.mark.parametrize(
    ("contrasts", "kind", "message"),
    [
        ("faces - houses", "T", r"contrast kind 'T' is not one of 't', 'F'"),
        (["faces", "houses"], "f", r"contrast kind 'f' is not one of 't', 'F'"),
        (
            {"faces_minus_houses": "faces - houses", "facesMinusHouses": "faces"},
            "t",
            "same file label",
        ),
        ({"../../x": "faces"}, "t", "path separator"),
    ],
)
def test_to_nifti_refuses_bad_kinds_and_names_before_writing(
    tmp_path: Path, contrasts: object, kind: str, message: str
) -> None:
    result = _store_fit(tmp_path)
    with pytest.raises(DesignError, match=message):
        result.to_nifti(tmp_path / "out", contrasts, prefix="sub-01", kind=kind)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert not list(tmp_path.glob("**/*statmap*"))


def test_threaded_default_scheduler_gives_the_same_numbers_as_synchronous() -> None:
    design, y = make_data()
    ds = xr.Dataset({"bold": (("time", "voxel"), y)}).chunk({"time": 15, "voxel": 6})
    threaded = bigglm.fit(ds, design, noise="ar1").compute()
    with dask.config.set(scheduler="synchronous"):
        sync = bigglm.fit(ds, design, noise="ar1").compute()
    np.testing.assert_array_equal(threaded.beta.values, sync.beta.values)


def test_nonstationary_ar_estimate_gives_nan_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A smooth residual whose Yule–Walker AR(2) estimate (3.71, -2.88) is explosive."""
    t = np.arange(12)
    y = np.random.default_rng(0).normal(size=(12, 4)) + 100
    y[:, 0] = 100 + np.sin(2 * np.pi * (t + 0.5) / 12)
    ds = xr.Dataset({"bold": (("time", "voxel"), y)})
    with caplog.at_level("WARNING", logger="bigglm.glm.result"):
        result = bigglm.fit(ds, pd.DataFrame({"constant": np.ones(12)}), noise="ar2").compute()
    assert result.dataset["status"].values.tolist() == [2, 0, 0, 0]
    assert np.isnan(result.ar.values[:, 0]).all() and np.isnan(result.sigma2.values[0])
    assert np.isfinite(result.contrast("constant")["z"].values[1:]).all()
    assert "1 nonstationary voxels" in caplog.text


@st.composite
def chunkings(draw: st.DrawFn, n_scans: int, n_vox: int) -> tuple[tuple[int, ...], int, int]:
    """Random time chunks (any sizes summing to n_scans), a voxel chunk and a fan-in."""
    cuts = sorted(draw(st.sets(st.integers(1, n_scans - 1), max_size=6)))
    sizes = tuple(np.diff([0, *cuts, n_scans]).tolist())
    return sizes, draw(st.integers(1, n_vox)), draw(st.integers(2, 5))


@settings(max_examples=15, deadline=None)
@given(data=st.data(), order=st.integers(0, 3))
def test_any_chunking_gives_the_unchunked_fit(data: st.DataObject, order: int) -> None:
    """Property: for any chunking and reduction fan-in, the statistics equal the
    single-chunk fit to 1e-12 (only the order of float64 sums changes)."""
    design, y = make_data(n_scans=37, n_vox=9, seed=order)
    time_chunks, voxel_chunk, fan_in = data.draw(chunkings(37, 9))
    noise = "ols" if order == 0 else f"ar{order}"
    whole = bigglm.fit(xr.Dataset({"bold": (("time", "voxel"), y)}), design.to_numpy(), noise=noise)
    ds = xr.Dataset({"bold": (("time", "voxel"), y)}).chunk(
        {"time": time_chunks, "voxel": voxel_chunk}
    )
    chunked = bigglm.fit(ds, design.to_numpy(), noise=noise, split_every=fan_in)
    np.testing.assert_allclose(
        chunked.compute().beta.values, whole.compute().beta.values, rtol=1e-12
    )
    np.testing.assert_allclose(chunked.sigma2.values, whole.sigma2.values, rtol=1e-12)
    assert list(chunked.beta["regressor"].values) == ["x0", "x1", "x2"]


def test_voxels_with_nan_data_are_flagged_nonfinite() -> None:
    design, y = make_data(n_vox=6)
    y[10, 4] = np.nan
    result = bigglm.fit(xr.Dataset({"bold": (("time", "voxel"), y)}), design, noise="ar1").compute()
    assert result.dataset["status"].values.tolist() == [0, 0, 0, 0, 3, 0]
    assert result.runs[0]["status"].attrs["flag_meanings"] == "ok constant nonstationary nonfinite"
    z = result.contrast("faces")["z"].values
    assert np.isnan(z[4]) and np.isfinite(np.delete(z, 4)).all()
