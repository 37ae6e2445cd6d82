"""Bad input: one clear StoreError naming the file and the fix, and nothing left on disk."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pytest

import bigglm
from bigglm.cli import main
from bigglm.exceptions import BigGLMWarning, StoreError


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def series(write_nifti, brain_series) -> np.ndarray:
    return brain_series((16, 16, 12), 6, seed=7)


def _refuses(sources, folder: Path, match: str, **kwargs) -> StoreError:  # type: ignore[no-untyped-def]
    """convert raises a StoreError matching ``match`` and leaves ``folder`` as it was."""
    before = _files(folder)
    with pytest.raises(StoreError, match=match) as info:
        bigglm.convert(sources, folder / "run.zarr", **kwargs)
    assert _files(folder) == before
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    err = _refuses(tmp_path / "nope.nii.gz", tmp_path, "no such file")
    assert "nope.nii.gz" in str(err)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    (tmp_path / "func").mkdir()
    _refuses(tmp_path / "func", tmp_path, "func: is a folder, not a NIfTI file")


def test_not_a_nifti(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii"
    path.write_text("these are not voxels\n" * 40)
    _refuses(path, tmp_path, "notes.nii: cannot be read as NIfTI")


def test_truncated_nii_is_caught_from_the_header(functional_nii: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.nii"
    cut.write_bytes(functional_nii.read_bytes()[:30_000])
    _refuses(cut, tmp_path, r"cut.nii: truncated: the header describes 43192 bytes")


@pytest.mark.parametrize("with_mask", [True, False])
def test_truncated_gz_leaves_nothing(write_nifti, series, tmp_path: Path, with_mask: bool) -> None:
    """Truncation of a .nii.gz shows only while decompressing: the partial store is removed."""
    whole = write_nifti(series, "whole.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    mask = np.ones(series.shape[:3], bool) if with_mask else None
    _refuses(cut, tmp_path, "cut.nii.gz: .*truncated", mask=mask)


def test_a_store_error_while_reading_is_not_rewrapped(
    write_nifti, series, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """StoreError is an OSError: the read loop's ``except OSError`` (for the system's read
    errors) passes bigglm's own StoreError on as it is, not as "read error (...)"."""
    import bigglm.io.nifti as nifti

    path = write_nifti(series, "whole.nii")

    def ended_early(stream: object, view: memoryview, source: nifti.SourceFile) -> None:
        raise StoreError(f"{source.path}: truncated: the data ended 4 bytes early; re-copy")

    monkeypatch.setattr(nifti, "_read_exact", ended_early)
    err = _refuses(path, tmp_path, r"whole.nii: truncated: the data ended 4 bytes early; re-copy$")
    assert "read error" not in str(err)


def test_corrupt_gz_crc(write_nifti, series, tmp_path: Path) -> None:
    whole = write_nifti(series, "whole.nii")
    raw = bytearray(gzip.compress(whole.read_bytes()))
    raw[-8] ^= 0xFF  # the CRC-32 of the trailer
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(raw))
    _refuses(
        bad, tmp_path, "bad.nii.gz: corrupt or truncated gzip data", mask=np.ones((16, 16, 12))
    )


def test_3d_file_where_4d_needed(write_nifti, series, tmp_path: Path) -> None:
    path = write_nifti(series[..., 0], "one.nii")
    _refuses(path, tmp_path, r"one.nii: is 3D .* must be a 4D series")


def test_3d_volumes_with_differing_shapes(write_nifti, series, tmp_path: Path) -> None:
    a = write_nifti(series[..., 0], "a.nii")
    b = write_nifti(series[:-1, :, :, 1], "b.nii")
    _refuses([a, b], tmp_path, r"b.nii: volume shape \(15, 16, 12\) differs", tr=2.0)


def test_3d_volumes_with_differing_affines(write_nifti, series, tmp_path: Path) -> None:
    a = write_nifti(series[..., 0], "a.nii")
    shifted = np.diag([3.0, 3.0, 3.5, 1.0])
    shifted[0, 3] = 1.5
    b = write_nifti(series[..., 1], "b.nii", affine=shifted)
    _refuses([a, b], tmp_path, r"b.nii: affine differs .* 1.5 mm", tr=2.0)


def test_list_holding_a_4d_file(write_nifti, series, tmp_path: Path) -> None:
    a = write_nifti(series[..., 0], "a.nii")
    b = write_nifti(series, "b.nii")
    _refuses([a, b], tmp_path, "b.nii: has shape .* must hold single 3D volumes", tr=2.0)


def test_mask_on_another_grid(write_nifti, series, tmp_path: Path) -> None:
    bold = write_nifti(series, "bold.nii")
    small = write_nifti(np.ones((16, 16, 11), np.uint8), "small_mask.nii")
    _refuses(bold, tmp_path, r"small_mask.nii: mask shape .* resample the mask", mask=small)
    moved = np.diag([3.0, 3.0, 3.5, 1.0])
    moved[2, 3] = -10.0
    other = write_nifti(np.ones((16, 16, 12), np.uint8), "moved_mask.nii", affine=moved)
    _refuses(bold, tmp_path, r"moved_mask.nii: mask affine differs", mask=other)


def test_empty_mask(write_nifti, series, tmp_path: Path) -> None:
    bold = write_nifti(series, "bold.nii")
    empty = write_nifti(np.zeros((16, 16, 12), np.uint8), "empty.nii")
    _refuses(bold, tmp_path, "empty.nii: the mask has no non-zero voxel", mask=empty)


def test_missing_tr(write_nifti, series, tmp_path: Path) -> None:
    path = write_nifti(series, "bold.nii", tr=0.0)
    _refuses(path, tmp_path, r"bold.nii: the header has no repetition time .* tr=")
    volumes = [write_nifti(series[..., t], f"v{t}.nii") for t in range(2)]
    _refuses(volumes, tmp_path, r"v0.nii: the header has no repetition time")


def test_implausible_header_tr(example4d_niigz: Path, tmp_path: Path) -> None:
    """nibabel's example4d says TR = 2000 with unit "sec": surely milliseconds."""
    _refuses(example4d_niigz, tmp_path, r"repetition time is 2000 s, which is implausible")


def test_bad_chunk_size(write_nifti, series, tmp_path: Path) -> None:
    path = write_nifti(series, "bold.nii")
    _refuses(path, tmp_path, "time_chunk must be a positive integer", time_chunk=0)


def test_empty_computed_mask(functional_nii: Path, tmp_path: Path) -> None:
    """nibabel's 3-slice series erodes to nothing (nilearn's mask is empty too)."""
    _refuses(functional_nii, tmp_path, "EPI mask computed from the mean volume is empty")


def test_nan_voxels_dropped_from_a_given_mask(write_nifti, series, tmp_path: Path) -> None:
    data = series.copy()
    data[3, 4, 5, 2] = np.nan
    data[8, 8, 6, 0] = np.inf
    data[9, 8, 6, :] = -np.inf
    path = write_nifti(data, "bold.nii")
    mask = np.ones((16, 16, 12), bool)
    with pytest.warns(BigGLMWarning, match="3 voxel\\(s\\) have NaN or Inf"):
        store = bigglm.convert(
            path, tmp_path / "run.zarr", mask=mask, time_chunk=4, voxel_chunk=500
        )
    ds = bigglm.open_run(store)
    expected = mask.copy()
    expected[3, 4, 5] = expected[8, 8, 6] = expected[9, 8, 6] = False
    np.testing.assert_array_equal(ds.mask.values, expected)
    np.testing.assert_array_equal(ds.bold.values, data[expected].T)
    assert ds.bold.data.chunks[1][0] == 500
    assert ds.attrs["parameters"]["nonfinite_voxels_dropped"] == 3
    assert _files(tmp_path) == {"bold.nii"} | {
        str(p.relative_to(tmp_path)) for p in store.rglob("*")
    } | {"run.zarr"}


def test_nan_voxels_dropped_from_a_computed_mask(write_nifti, series, tmp_path: Path) -> None:
    data = series.copy()
    data[8, 8, 6, 3] = np.nan  # the centre of the brain
    path = write_nifti(data, "bold.nii.gz")
    with pytest.warns(BigGLMWarning, match="1 voxel\\(s\\) have NaN or Inf"):
        store = bigglm.convert(path, tmp_path / "run.zarr")
    ds = bigglm.open_run(store)
    assert not ds.mask.values[8, 8, 6]
    assert ds.mask.values[7, 8, 6] and ds.mask.values[9, 8, 6]
    assert np.isfinite(ds.bold.values).all()


def test_all_voxels_nonfinite(write_nifti, series, tmp_path: Path) -> None:
    data = series.copy()
    data[:4, :4, :4, 1] = np.nan
    path = write_nifti(data, "bold.nii")
    mask = np.zeros((16, 16, 12), bool)
    mask[:4, :4, :4] = True
    with pytest.warns(BigGLMWarning, match="64 voxel"):
        _refuses(path, tmp_path, "every voxel of the mask has NaN or Inf", mask=mask)


def test_finite_series_gives_no_warning(write_nifti, series, tmp_path: Path) -> None:
    path = write_nifti(series, "bold.nii")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bigglm.convert(path, tmp_path / "run.zarr")


def test_cli_prints_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["convert", str(tmp_path / "missing.nii"), "--store", str(tmp_path / "s.zarr")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [
        f"bigglm convert: error: {tmp_path / 'missing.nii'}: no such file; check the path"
    ]


def test_cli_converts_and_refuses_to_overwrite(
    example4d_niigz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "run.zarr"
    args = ["convert", str(example4d_niigz), "--store", str(store), "--tr", "2.0"]
    assert main([*args, "--time-chunk", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(store)
    ds = bigglm.open_run(store)
    assert ds.bold.data.chunks[0] == (1, 1)
    assert ds.attrs["tr"] == 2.0
    assert main(args) == 2
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--tr", "2.5"]) == 0
    assert bigglm.open_run(store).attrs["tr"] == 2.5


def test_sources_unchanged_after_failure(write_nifti, series, tmp_path: Path) -> None:
    path = write_nifti(series, "bold.nii")
    before = path.read_bytes()
    with pytest.raises(StoreError):
        bigglm.convert(path, tmp_path / "run.zarr", mask=np.zeros((16, 16, 12), bool))
    assert path.read_bytes() == before
    assert nibabel.load(path).shape == series.shape
