"""What bigglm may replace or delete (bigglm.io.artefacts), and its locks (bigglm.io.locks).

The rule: no function deletes or replaces a path it cannot prove bigglm wrote. Real
folders, real Zarr stores, real NIfTI files and real processes (killed ones included).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import bigglm
from bigglm.exceptions import StoreError
from bigglm.io.artefacts import kind_of, remove_stale_staging, writing

MASK = np.ones((17, 21, 3), bool)


@pytest.fixture
def store(functional_nii: Path, tmp_path: Path) -> Path:
    return bigglm.convert(functional_nii, tmp_path / "run.zarr", mask=MASK)


@pytest.fixture
def result(store: Path) -> Any:
    n = bigglm.open_run(store).sizes["time"]
    design = pd.DataFrame({"a": np.tile([1.0, 0.0], n // 2), "constant": 1.0})
    return bigglm.fit(store, design).compute()


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): p.read_bytes() for p in files}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- item 1: GLMResult.to_zarr --------------------------------------------------------


def test_to_zarr_never_replaces_a_user_folder(result: Any, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.docx").write_bytes(b"four years")
    with pytest.raises(StoreError, match=r"precious: exists and is not a Zarr store.*thesis"):
        result.to_zarr(precious, overwrite=True)
    assert (precious / "thesis.docx").read_bytes() == b"four years"
    assert _hidden(tmp_path) == []


def test_to_zarr_never_replaces_the_input_run_store(result: Any, store: Path) -> None:
    before = _tree(store)
    with pytest.raises(StoreError, match=r"is a bigglm run-store.*only a glm-result"):
        result.to_zarr(store, overwrite=True)
    assert _tree(store) == before
    assert bigglm.open_run(store).sizes["time"] == 20


def test_to_zarr_never_replaces_or_hides_a_file(result: Any, tmp_path: Path) -> None:
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    with pytest.raises(StoreError, match="is a file not written by bigglm"):
        result.to_zarr(afile, overwrite=True)
    assert afile.read_text() == "mine"
    assert _hidden(tmp_path) == []  # no .afile.txt.old-... left behind


def test_to_zarr_replaces_its_own_result_only_with_overwrite(result: Any, tmp_path: Path) -> None:
    target = result.to_zarr(tmp_path / "glm.zarr")
    assert kind_of(target) == "glm-result"
    with pytest.raises(StoreError, match="already exists; pass overwrite=True"):
        result.to_zarr(target)
    result.to_zarr(target, overwrite=True)
    assert bigglm.GLMResult.from_zarr(target).beta.shape == result.beta.shape
    assert _hidden(tmp_path) == []


def test_stores_of_earlier_versions_are_recognised(result: Any, store: Path) -> None:
    """Stores written before markers existed are still replaceable by their own kind."""
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["bigglm_artefact"]
    (store / "zarr.json").write_text(json.dumps(meta))
    assert kind_of(store) == "run-store"


# --- item 1: `bigglm fit --output OUT` --------------------------------------------------


_FIT = (sys.executable, "-m", "bigglm.cli", "fit")
_OPTIONS = ("--noise", "ols", "--contrast", "a=a")


def _fit_cli(store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    events = out.parent / "events.tsv"
    events.write_text("onset\tduration\ttrial_type\n0\t10\ta\n")
    return subprocess.run(
        [*_FIT, str(store), "--events", str(events), *_OPTIONS, "--output", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _refused(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_fit_cli_never_deletes_a_user_file_in_glm_zarr(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    (out / "glm.zarr").mkdir(parents=True)
    (out / "glm.zarr" / "NOTES.txt").write_text("my notes")
    for extra in ((), ("--overwrite",)):  # refused with or without --overwrite
        line = _refused(_fit_cli(store, out, *extra))
        assert "glm.zarr: exists and is not a Zarr store written by bigglm" in line
        assert (out / "glm.zarr" / "NOTES.txt").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == ["glm.zarr"]


def test_fit_cli_never_deletes_a_user_file_inside_a_result_bigglm_wrote(
    store: Path, tmp_path: Path
) -> None:
    """The case the issue reports: OUT/glm.zarr is bigglm's result, NOTES.txt inside it
    is the user's; --overwrite replaces the result only when nothing else is inside."""
    out = tmp_path / "OUT"
    assert _fit_cli(store, out).returncode == 0
    for where in ("NOTES.txt", "beta/NOTES.txt", "beta/c/notes"):
        note = out / "glm.zarr" / where
        note.write_text("my notes")
        line = _refused(_fit_cli(store, out, "--overwrite"))
        assert f"also holds what bigglm did not write ({where})" in line
        assert note.read_text() == "my notes"
        note.unlink()
    assert _fit_cli(store, out, "--overwrite").returncode == 0


def test_fit_cli_keeps_existing_maps_without_overwrite(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    out.mkdir()
    ds = bigglm.open_run(store)
    old = bigglm.to_nifti(ds.bold.mean("time"), ds, out / "contrast-a_stat-z_statmap.nii.gz")
    before = old.read_bytes()
    line = _refused(_fit_cli(store, out))
    assert "contrast-a_stat-z_statmap.nii.gz: already exists" in line
    assert old.read_bytes() == before and not (out / "glm.zarr").exists()


@pytest.mark.parametrize("inside", [".", "maps", "bold/maps"])
def test_fit_cli_never_writes_into_the_input_store(store: Path, inside: str) -> None:
    """``--output run.zarr`` (or a folder inside it) wrote glm.zarr and the maps into
    the run store: files bigglm then took for a user's (the store was never replaced
    again) and a child group Zarr lists."""
    events = store.parent / "events.tsv"
    events.write_text("onset\tduration\ttrial_type\n0\t10\ta\n")
    before = _tree(store)
    line = _refused(
        subprocess.run(
            [
                *_FIT,
                str(store),
                "--events",
                str(events),
                *_OPTIONS,
                "--output",
                str(store / inside),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    )
    assert f"is inside the bigglm run-store {store}" in line
    assert _tree(store) == before  # not even an empty output folder


def test_results_and_maps_are_never_written_inside_a_store(result: Any, store: Path) -> None:
    before = _tree(store)
    with pytest.raises(StoreError, match="is inside the bigglm run-store"):
        result.to_zarr(store / "sub", overwrite=True)
    with pytest.raises(StoreError, match="is inside the bigglm run-store"):
        result.to_nifti(store / "maps", "a", prefix="sub-01", overwrite=True)
    with pytest.raises(StoreError, match="is inside the bigglm run-store"):
        result.write_residuals(store, "sub-01", overwrite=True)
    assert _tree(store) == before


# --- item 2: convert(overwrite=True) ----------------------------------------------------


def test_convert_never_replaces_a_zarr_like_folder(functional_nii: Path, tmp_path: Path) -> None:
    zarrlike = tmp_path / "zarrlike"
    (zarrlike / "rawdata").mkdir(parents=True)
    (zarrlike / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (zarrlike / "notes.txt").write_text("notes")
    (zarrlike / "rawdata" / "scan.dat").write_bytes(b"\x00\x01")
    before = _tree(zarrlike)
    with pytest.raises(StoreError, match=r"is a Zarr store not written by bigglm.*notes\.txt"):
        bigglm.convert(functional_nii, zarrlike, overwrite=True, mask=MASK)
    assert _tree(zarrlike) == before
    assert _hidden(tmp_path) == []


def test_convert_never_replaces_a_glm_result(
    functional_nii: Path, result: Any, tmp_path: Path
) -> None:
    fitted = result.to_zarr(tmp_path / "glm.zarr")
    with pytest.raises(StoreError, match="is a bigglm glm-result"):
        bigglm.convert(functional_nii, fitted, overwrite=True, mask=MASK)
    assert kind_of(fitted) == "glm-result"


# --- maps: to_nifti and GLMResult.to_nifti ----------------------------------------------


def test_to_nifti_never_replaces_a_nifti_bigglm_did_not_write(
    store: Path, result: Any, tmp_path: Path
) -> None:
    theirs = tmp_path / "sub-01_contrast-a_stat-z_statmap.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)), theirs)
    before = theirs.read_bytes()
    ds = bigglm.open_run(store)
    with pytest.raises(StoreError, match="is a file not written by bigglm"):
        bigglm.to_nifti(ds.bold.mean("time"), ds, theirs, overwrite=True)
    with pytest.raises(StoreError, match="is a file not written by bigglm"):
        result.to_nifti(tmp_path, "a", prefix="sub-01", overwrite=True)
    assert theirs.read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("sub-01_*")) == [theirs.name]  # none written


def test_to_nifti_replaces_its_own_map_only_with_overwrite(store: Path, tmp_path: Path) -> None:
    ds = bigglm.open_run(store)
    path = bigglm.to_nifti(ds.bold.mean("time"), ds, tmp_path / "mean.nii.gz")
    assert kind_of(path) == "image"
    with pytest.raises(StoreError, match="already exists"):
        bigglm.to_nifti(ds.bold.max("time"), ds, path)
    bigglm.to_nifti(ds.bold.max("time"), ds, path, overwrite=True)
    assert np.nanmax(np.asarray(nib.load(path).dataobj)) == float(ds.bold.max())


# --- staging of killed writers ----------------------------------------------------------

_WRITER = """
import sys, time
from pathlib import Path
from bigglm.io.artefacts import writing
with writing(Path(sys.argv[1]), "run-store", overwrite=False, directory=True) as stage:
    (stage / "half").write_text("x")
    print(stage, flush=True)
    time.sleep(600)
"""


def test_staging_is_removed_only_once_its_writer_is_dead(tmp_path: Path) -> None:
    target = tmp_path / "run.zarr"
    unmarked = tmp_path / ".run.zarr.partial-0123456789ab"  # no owner record: never removed
    unmarked.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        stage = Path(writer.stdout.readline().strip())  # type: ignore[union-attr]
        assert stage.is_dir()
        assert remove_stale_staging(target) == []  # its writer is alive
        assert remove_stale_staging(tmp_path, folder=True) == []
        assert stage.is_dir()
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert remove_stale_staging(target) == [stage]
    assert not stage.exists() and unmarked.is_dir()
    assert _hidden(tmp_path) == [unmarked.name]  # its owner record went with it


def test_a_failed_write_removes_only_its_own_staging(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    with pytest.raises(RuntimeError), writing(target, "provenance", overwrite=False) as stage:
        stage.write_text("{}")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --- item 10: the pipeline's unit lock --------------------------------------------------


def _hold_unit_lock(outputs: str, start: Any, held: Any) -> None:
    import psutil  # noqa: F401  (imported before the race, so that the processes start at once)

    from bigglm.pipeline.lock import lock_units

    start.wait()
    try:
        with lock_units(outputs, ["sub-01"]):
            begin = time.monotonic()
            time.sleep(0.05)
            held.put((os.getpid(), begin, time.monotonic()))
    except StoreError:
        held.put(None)


def test_a_dead_holders_lock_goes_to_one_process_at_a_time(tmp_path: Path) -> None:
    """16 processes start together after a dead PID's lock is planted: never two holders
    (5 trials; the kernel grants an flock to one open file at a time)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "created": 0.0}
    context = multiprocessing.get_context("fork")
    for trial in range(5):
        outputs = tmp_path / f"trial-{trial}"
        lock = outputs / ".bigglm" / "locks" / "sub-01.lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps(stale))
        start, held = context.Event(), context.Queue()
        processes = [
            context.Process(target=_hold_unit_lock, args=(str(outputs), start, held))
            for _ in range(16)
        ]
        for process in processes:
            process.start()
        start.set()
        outcomes = [held.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        spans = sorted(o[1:] for o in outcomes if o is not None)
        assert spans, "nobody took the stale lock"
        for (_, end), (begin, _) in itertools.pairwise(spans):
            assert begin >= end, f"trial {trial}: two processes held the lock at once"
        assert not lock.exists()


# --- item 11: one store written by two processes at once ---------------------------------


def _convert_into(source: str, target: str, done: Any) -> None:
    try:
        bigglm.convert(source, target, overwrite=True, mask=MASK)
        done.put("ok")
    except Exception as err:  # reported to the test
        done.put(repr(err))


def test_two_conversions_of_one_store_at_once_both_succeed(
    functional_nii: Path, tmp_path: Path
) -> None:
    """Processes converting one run into one store at once (as two analyses sharing a
    store folder do) all succeed, and the store is complete and correct."""
    target = tmp_path / "run.zarr"
    context = multiprocessing.get_context("fork")
    bigglm.convert(functional_nii, target, mask=MASK)  # a store to replace, as on a rerun
    for _ in range(3):
        done = context.Queue()
        workers = [
            context.Process(target=_convert_into, args=(str(functional_nii), str(target), done))
            for _ in range(8)
        ]
        for worker in workers:
            worker.start()
        outcomes = [done.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        assert outcomes == ["ok"] * 8
        ds = bigglm.open_run(target)
        expected = nib.load(functional_nii).get_fdata(dtype=np.float32)[MASK]
        np.testing.assert_allclose(ds.bold.values, expected.T, rtol=1e-6)
        assert [p.name for p in tmp_path.iterdir()] == ["run.zarr"]


_SLOW_CONVERSION = (
    "import bigglm, sys; "
    "bigglm.convert(sys.argv[1], sys.argv[2], mask=None, time_chunk=2, voxel_chunk=64); "
    "print(bigglm.open_run(sys.argv[2]).sizes['time'])"
)


def test_a_live_conversions_staging_survives_another_analysis_cleaning_up(
    write_nifti: Any, brain_series: Any, tmp_path: Path
) -> None:
    """The pipeline cleans a store's leftovers before converting it; with a store folder
    shared by two analyses, the other's conversion in progress must survive that."""
    from bigglm.pipeline.steps import _remove_partials

    source = write_nifti(brain_series((40, 40, 30), 300, seed=0), "bold.nii")
    target = tmp_path / "run.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERSION, str(source), str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".run.zarr.partial-*/bold/c/1/*")):
        assert proc.poll() is None, "conversion finished before the clean-up could run"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    _remove_partials(target)  # what another analysis's convert step does first
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.strip() == "300" and bigglm.open_run(target).sizes["time"] == 300


def test_a_design_table_is_bigglms_only_while_its_sidecar_says_so(tmp_path: Path) -> None:
    """TSVs have no room for a marker: a BIDS-style JSON sidecar holds their SHA-256."""
    table = tmp_path / "sub-01_design.tsv"
    for value in (1.0, 2.0):  # written, then replaced by a rerun
        with writing(table, "design-table", overwrite=True) as stage:
            pd.DataFrame({"a": [value]}).to_csv(stage, sep="\t", index=False)
    assert kind_of(table) == "design-table" and pd.read_csv(table, sep="\t")["a"][0] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub-01_design.json", table.name]
    table.write_text("a\n3\n")  # edited by hand: no longer bigglm's
    with pytest.raises(StoreError, match="is a file not written by bigglm"):
        with writing(table, "design-table", overwrite=True) as stage:
            stage.write_text("a\n4\n")
    assert table.read_text() == "a\n3\n"
    theirs = tmp_path / "sub-02_design.tsv"
    theirs.with_suffix(".json").write_text('{"Description": "mine"}')  # a user's sidecar
    with pytest.raises(StoreError, match=r"sub-02_design\.json: exists and is not bigglm's"):
        with writing(theirs, "design-table", overwrite=True) as stage:
            stage.write_text("a\n5\n")
    assert theirs.with_suffix(".json").read_text() == '{"Description": "mine"}'


def test_replace_atomically_syncs_and_leaves_the_old_file_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bigglm's state files: flushed to disk before the rename; a failed write leaves the
    old file as it was and no temporary file beside it."""
    from bigglm.io import artefacts

    state = tmp_path / "state.json"
    artefacts.replace_atomically(state, "old")
    synced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(artefacts.os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    assert artefacts.replace_atomically(state, b"new").read_bytes() == b"new"
    assert synced

    def disk_full(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artefacts.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        artefacts.replace_atomically(state, "newer")
    assert state.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
