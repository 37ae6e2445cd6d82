"""The conversion pipeline's fast paths give exactly what the plain paths give.

Reused read buffers (``VolumeStream.blocks(recycle=...)``) behind the read-ahead thread,
with the SHA-256 computed in its own thread, must yield the same blocks and checksums as
fresh buffers read and hashed one after the other.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import pytest

from bigglm.io.nifti import VolumeStream, inspect_sources
from bigglm.io.streaming import prefetched


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [None, "int16"])
def test_recycled_blocks_behind_prefetch_equal_fresh_blocks(
    write_nifti, brain_series, suffix: str, dtype: str | None
) -> None:
    data = brain_series((12, 10, 8), 23, seed=3)
    path = write_nifti(data, f"bold{suffix}", dtype=dtype)
    series = inspect_sources(path)
    fresh = VolumeStream(series)
    expected = [block.copy() for block in fresh.blocks(2)]
    recycled = VolumeStream(series)
    got = []
    with contextlib.closing(prefetched(recycled.blocks(2, recycle=3))) as blocks:
        for block in blocks:
            got.append(block.copy())
    assert len(got) == len(expected) == 12
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert recycled.provenance == fresh.provenance
    assert recycled.provenance[0]["sha256"] == _sha256(path)
    assert recycled.provenance[0]["size"] == path.stat().st_size


def test_recycled_blocks_across_a_list_of_volumes(write_nifti, brain_series) -> None:
    """3D files are joined into blocks: parts kept across files are never overwritten."""
    data = brain_series((9, 8, 7), 7, seed=5)
    paths = [write_nifti(data[..., t], f"vol{t}{'.nii.gz' if t % 2 else '.nii'}") for t in range(7)]
    series = inspect_sources(paths, tr=2.0)
    stream = VolumeStream(series)
    with contextlib.closing(prefetched(stream.blocks(3, recycle=3))) as blocks:
        got = np.concatenate([block.copy() for block in blocks])
    expected = np.stack([data[..., t].ravel(order="F") for t in range(7)])
    np.testing.assert_array_equal(got, expected)
    assert [s["sha256"] for s in stream.provenance] == [_sha256(p) for p in paths]


def test_recycle_needs_two_buffers(functional_nii: Path) -> None:
    with pytest.raises(ValueError, match="recycle"):
        next(VolumeStream(inspect_sources(functional_nii)).blocks(4, recycle=1))


def test_checksum_off_reads_the_same_blocks(functional_nii: Path) -> None:
    series = inspect_sources(functional_nii)
    plain = np.concatenate(list(VolumeStream(series, checksum=False).blocks(6, recycle=0)))
    hashed = np.concatenate([b.copy() for b in VolumeStream(series).blocks(6, recycle=0)])
    np.testing.assert_array_equal(plain, hashed)


def _chunk_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted((folder / "bold" / "c").rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(("n_volumes", "n_voxels"), [(10, 23), (8, 16), (3, 5), (9, 40)])
def test_direct_chunk_writes_equal_zarr_writes(
    tmp_path: Path, n_volumes: int, n_voxels: int
) -> None:
    """StoreWriter encodes whole chunk rows itself: the chunk files are Zarr's, byte for byte.

    Covers chunks overhanging the array in time and in voxels (NaN padding), a chunk all
    NaN (stored, as Zarr does with ``write_empty_chunks``: a missing chunk is damage), and
    a write not on chunk boundaries (left to Zarr).
    """
    import zarr

    from bigglm.io.store import StoreWriter

    rng = np.random.default_rng(n_volumes * n_voxels)
    data = rng.normal(1000.0, 20.0, (n_volumes, n_voxels)).astype(np.float32)
    data[:4, :8] = np.nan  # one whole chunk of NaN
    mask = np.zeros((6, 6, 2), bool)
    mask.ravel()[:n_voxels] = True
    chunks = (4, 8)
    direct = StoreWriter(tmp_path / "direct", mask, n_volumes=n_volumes, tr=2.0, chunks=chunks)
    for start in range(0, n_volumes, chunks[0]):
        direct.write(start, data[start : start + chunks[0]])
    assert direct._rows._encoder is not None
    plain = zarr.open_group(tmp_path / "plain", mode="w-", zarr_format=3)
    zarrs = plain.create_array(  # this array object: the config is not stored with it
        "bold",
        shape=data.shape,
        chunks=chunks,
        dtype="float32",
        compressors=direct.bold.compressors,
        fill_value=np.nan,
        config={"write_empty_chunks": True},
    )
    zarrs[...] = data
    assert _chunk_files(tmp_path / "direct") == _chunk_files(tmp_path / "plain")
    assert "bold/c/0/0" in _chunk_files(tmp_path / "direct")  # the all-NaN chunk
    np.testing.assert_array_equal(direct.bold[...], data)
    # off the chunk grid: Zarr's read-modify-write, same values
    direct.write(1, data[1:3] + 1)
    expected = data.copy()
    expected[1:3] += 1
    np.testing.assert_array_equal(direct.bold[...], expected)


def test_gather_rows_refuses_columns_out_of_range() -> None:
    """The gather takes with mode="clip" for speed, so bad columns must be caught first."""
    from bigglm.io.streaming import gather_rows

    blocks = iter([np.zeros((2, 4), np.float32)])
    with pytest.raises(IndexError, match="out of range"):
        list(gather_rows(blocks, np.array([1, 4]), 2))
    with pytest.raises(IndexError, match="out of range"):
        list(gather_rows(iter([np.zeros((2, 4), np.float32)]), np.array([-1, 2]), 2))


def test_gather_rows_puts_columns_in_the_order_given() -> None:
    from bigglm.io.streaming import gather_rows

    rng = np.random.default_rng(0)
    block = rng.normal(size=(5, 50)).astype(np.float32)
    columns = rng.permutation(50)[:17]
    rows = [r.copy() for r in gather_rows(iter([block[:3], block[3:]]), columns, 2)]
    np.testing.assert_array_equal(np.concatenate(rows), block[:, columns])
