"""Damaged stores are detected: missing chunk files, flipped bytes, and old stores still open.

Oracles: Zarr itself (the hand-written chunks must be the bytes Zarr writes with the same
codecs, checksum included) and stores damaged on disk the way a failing disk or a stray
``rm`` damages them: a chunk file deleted, one byte of one flipped.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr

import bigglm
from bigglm.exceptions import StoreError
from bigglm.io import verify_store
from bigglm.io.integrity import CHECKSUM
from bigglm.io.store import BOLD_CODEC, StoreWriter

#: nibabel's functional.nii has 3 slices: too thin for an EPI mask; give a box.
MASK = np.zeros((17, 21, 3), bool)
MASK[2:15, 3:19, :] = True


@pytest.fixture
def store(functional_nii: Path, tmp_path: Path) -> Path:
    """A converted run: 20 volumes x 624 voxels in chunks of 8 x 256 (3 x 3 chunks)."""
    return bigglm.convert(
        functional_nii, tmp_path / "run.zarr", time_chunk=8, voxel_chunk=256, mask=MASK
    )


def _flip_byte(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _fit(store: Path) -> Any:
    design = pd.DataFrame({"constant": np.ones(20), "trend": np.linspace(-1, 1, 20)})
    with_scheduler = bigglm.fit(store, design, noise="ols")
    return with_scheduler.compute()


def test_every_chunk_is_written_and_checksummed(store: Path) -> None:
    group = zarr.open_group(store, mode="r")
    for name in ("bold", "mask", "i", "j", "k", "time"):
        array = group[name]
        assert isinstance(array, zarr.Array)
        assert any(isinstance(c, type(CHECKSUM)) for c in array.compressors), name
        assert array.nchunks_initialized == array.nchunks, name


def test_an_all_nan_chunk_is_written(tmp_path: Path) -> None:
    """NaN is the fill value: Zarr would leave such a chunk out, and a missing chunk is damage."""
    writer = StoreWriter(tmp_path, np.ones((4, 1, 1), bool), n_volumes=2, tr=1.0, chunks=(1, 4))
    writer.write(0, np.full((1, 4), np.nan, np.float32))  # the hand-written chunk row
    writer.bold[1:2, :] = np.full((1, 4), np.nan, np.float32)  # through Zarr
    writer.finish({"tr": 1.0})
    assert (tmp_path / "bold/c/0/0").is_file() and (tmp_path / "bold/c/1/0").is_file()
    verify_store(tmp_path, full=True)
    assert np.isnan(bigglm.open_run(tmp_path).bold.values).all()


def test_hand_written_chunks_are_the_bytes_zarr_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = (1000 + rng.normal(size=(8, 600))).astype(np.float32)
    rows[:, 256:512] = np.nan  # an all-NaN chunk
    mine = StoreWriter(tmp_path / "mine", np.ones((600, 1, 1), bool), n_volumes=8, tr=1.0,
                       chunks=(8, 256))  # fmt: skip
    mine.write(0, rows)
    theirs = zarr.create_array(
        tmp_path / "theirs",
        shape=(8, 600),
        chunks=(8, 256),
        dtype="float32",
        compressors=(BOLD_CODEC, CHECKSUM),
        fill_value=np.nan,
        config={"write_empty_chunks": True},
    )
    theirs[...] = rows
    for index in range(3):  # a full chunk, the all-NaN one, the edge chunk (NaN-padded)
        written = (tmp_path / f"mine/bold/c/0/{index}").read_bytes()
        assert written == (tmp_path / f"theirs/c/0/{index}").read_bytes(), index
        assert int.from_bytes(written[-4:], "little") != 0  # the checksum is there


def test_a_deleted_chunk_is_refused_at_open(store: Path) -> None:
    (store / "bold/c/1/2").unlink()
    with pytest.raises(StoreError, match=r"run\.zarr: chunk bold/c/1/2 is missing") as info:
        bigglm.open_run(store)
    assert str(store) in str(info.value)
    with pytest.raises(StoreError, match="chunk bold/c/1/2 is missing"):
        _fit(store)
    with pytest.raises(StoreError, match="chunk bold/c/1/2 is missing"):
        verify_store(store)


def test_a_deleted_chunk_in_a_store_given_as_an_object_is_refused(store: Path) -> None:
    """Not a local directory to list: Zarr's count of stored chunks tells."""
    from zarr.storage import LocalStore, WrapperStore

    (store / "bold/c/2/0").unlink()
    wrapped = WrapperStore(LocalStore(store, read_only=True))
    with pytest.raises(StoreError, match=r"1 of the 9 chunks of 'bold' are missing"):
        bigglm.open_run(wrapped)


def test_a_chunk_deleted_after_opening_fails_the_read(store: Path) -> None:
    ds = bigglm.open_run(store)
    (store / "bold/c/0/1").unlink()
    with pytest.raises(StoreError, match=r"run\.zarr: chunk bold/c/0/1 is damaged \(its file"):
        ds.bold.sum().compute(scheduler="sync")


def test_a_flipped_byte_is_one_error_naming_store_and_chunk(store: Path) -> None:
    _flip_byte(store / "bold/c/2/1")
    ds = bigglm.open_run(store)  # structurally whole: opens
    verify_store(store)
    expected = r"run\.zarr: chunk bold/c/2/1 is damaged \(checksum mismatch\)"
    with pytest.raises(StoreError, match=expected) as info:
        ds.bold.sum().compute(scheduler="threads")
    assert str(store) in str(info.value) and "overwrite=True" in str(info.value)
    with pytest.raises(StoreError, match=expected):
        _fit(store)
    with pytest.raises(StoreError, match=expected):
        verify_store(store, full=True)


def test_a_damaged_small_array_is_named(store: Path) -> None:
    _flip_byte(store / "i/c/0", offset=10)
    with pytest.raises(StoreError, match=r"chunk i/c/0 is damaged \(checksum mismatch\)"):
        bigglm.open_run(store)


def test_the_error_reaches_the_client_from_a_worker(store: Path, local_client: Any) -> None:
    error = StoreError("sub-01.zarr: chunk bold/c/1/3 is damaged (checksum mismatch)")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is StoreError and str(again) == str(error)
    _flip_byte(store / "bold/c/0/0")
    future = local_client.compute(bigglm.open_run(store).bold.sum())
    with pytest.raises(StoreError, match=r"chunk bold/c/0/0 is damaged \(checksum mismatch\)"):
        future.result()


def test_fit_command_on_a_damaged_store_is_one_line(store: Path, tmp_path: Path) -> None:
    _flip_byte(store / "bold/c/1/1")
    events = tmp_path / "events.tsv"
    events.write_text("onset\tduration\ttrial_type\n4\t4\ta\n20\t4\ta\n")
    done = subprocess.run(
        [sys.executable, "-m", "bigglm.cli", "fit", str(store), "--events", str(events),
         "--contrast", "a=a", "--noise", "ols", "--output", str(tmp_path / "maps")],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "bigglm/cli.py" not in done.stderr  # the error is not a traceback of ours
    # above it only the CLI's progress log: not distributed's log of the failed task, nor
    # of the tasks cancelled while the local cluster shuts down
    errors = [line for line in done.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1 and errors[0].startswith("bigglm fit: error:"), done.stderr
    assert (
        "chunk bold/c/1/1 is damaged (checksum mismatch)" in errors[0] and str(store) in errors[0]
    )


def _old_store(path: Path, data: np.ndarray) -> Path:
    """A store as bigglm wrote it before checksums: no crc32c, all-NaN chunks left out."""
    group = zarr.open_group(path, mode="w-", zarr_format=3)
    group.create_array("bold", data=data, chunks=(2, 2), compressors=BOLD_CODEC,
                       fill_value=np.nan, dimension_names=("time", "voxel"))  # fmt: skip
    mask = np.ones((data.shape[1], 1, 1), bool)
    group.create_array("mask", data=mask, dimension_names=("x", "y", "z"))
    for name, index in zip("ijk", np.nonzero(mask), strict=True):
        group.create_array(name, data=index.astype(np.int32), dimension_names=("voxel",))
    group.create_array("time", data=np.arange(data.shape[0], dtype=np.float64),
                       dimension_names=("time",))  # fmt: skip
    group.attrs.update({"bigglm": {"tr": 1.0}})
    group.attrs.update({"complete": True})
    return path


def test_a_store_without_checksums_still_opens(tmp_path: Path) -> None:
    data = np.arange(16, dtype=np.float32).reshape(4, 4)
    data[2:, 2:] = np.nan  # an all-NaN chunk: absent, as Zarr leaves it
    store = _old_store(tmp_path / "old.zarr", data)
    assert not (store / "bold/c/1/1").exists()
    verify_store(store, full=True)
    np.testing.assert_array_equal(bigglm.open_run(store).bold.values, data)


def test_a_corrupt_chunk_of_an_old_store_is_named(tmp_path: Path) -> None:
    """No checksum to fail: Blosc's decompression error, today a bare RuntimeError."""
    data = np.arange(16, dtype=np.float32).reshape(4, 4)
    store = _old_store(tmp_path / "old.zarr", data)
    chunk = store / "bold/c/1/0"
    chunk.write_bytes(chunk.read_bytes()[:8] + b"\xff" * 8)  # a mangled Blosc header
    with pytest.raises(StoreError, match=r"old\.zarr: chunk bold/c/1/0 is damaged \(cannot be"):
        bigglm.open_run(store).bold.values  # noqa: B018
