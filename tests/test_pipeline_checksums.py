"""Input checksums remembered across workflow runs (``<outputs>/.bigglm/checksums``).

A rerun must notice every changed input and must not read unchanged ones again. The
reference for each digest is ``hashlib.sha256`` of the file's bytes, computed here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from bigglm.config import parse_config
from bigglm.pipeline import STATE, run_analysis
from bigglm.pipeline.records import Checksums

HOUR_NS = 3600 * 10**9


def _age(path: Path) -> None:
    """Set the file's access and modification times an hour back."""
    then = time.time_ns() - HOUR_NS
    os.utime(path, ns=(then, then))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entries(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_digest_is_remembered_and_reused_by_a_later_run(tmp_path: Path) -> None:
    source, folder = tmp_path / "bold.bin", tmp_path / "checksums"
    source.write_bytes(b"abc" * 1000)
    _age(source)
    assert Checksums(folder)(source) == _sha(b"abc" * 1000)
    (entry,) = folder.glob("*.json")
    # a later process trusts the record of a file in exactly this state and does not
    # read the file: a planted digest comes back
    record = json.loads(entry.read_text())
    entry.write_text(json.dumps({**record, "sha256": "f" * 64}))
    assert Checksums(folder)(source) == "f" * 64


def test_content_changed_in_place_with_times_restored_is_hashed_again(tmp_path: Path) -> None:
    source, folder = tmp_path / "bold.bin", tmp_path / "checksums"
    source.write_bytes(b"abc")
    _age(source)
    before = source.stat()
    Checksums(folder)(source)
    time.sleep(0.01)  # the change time moves on with the rewrite below
    with source.open("r+b") as f:  # same inode, same size
        f.write(b"abd")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = source.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert Checksums(folder)(source) == _sha(b"abd")


def test_a_file_modified_just_before_hashing_is_not_remembered(tmp_path: Path) -> None:
    source, folder = tmp_path / "bold.bin", tmp_path / "checksums"
    source.write_bytes(b"fresh")
    assert Checksums(folder)(source) == _sha(b"fresh")
    assert not list(folder.glob("*.json"))  # it may still be written within the same tick


def test_unreadable_or_foreign_records_are_ignored(tmp_path: Path) -> None:
    source, folder = tmp_path / "bold.bin", tmp_path / "checksums"
    source.write_bytes(b"abc")
    _age(source)
    Checksums(folder)(source)
    (entry,) = folder.glob("*.json")
    for text in ("{not json", "[]", json.dumps({"stat": [], "sha256": "f" * 64})):
        entry.write_text(text)
        assert Checksums(folder)(source) == _sha(b"abc")


@pytest.mark.cluster
def test_workflow_rerun_takes_unchanged_inputs_from_the_record(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    for path in tiny_bids.rglob("*"):
        if path.is_file():
            _age(path)
    inputs = {
        "bids": {
            "derivatives": str(tiny_bids / "derivatives"),
            "raw": str(tiny_bids / "raw"),
            "subjects": ["01"],
        },
        "confounds": ["trans_x"],
    }
    config = parse_config(tiny_config(tiny_bids, tmp_path / "out", inputs=inputs))
    run_analysis(config, client=local_client)
    folder = tmp_path / "out" / STATE / "checksums"
    bold = tiny_bids / "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.nii.gz"
    records = {Path(e["stat"][0]): e for e in _entries(folder)}
    assert records[bold.resolve()]["sha256"] == _sha(bold.read_bytes())
    (outcome,) = run_analysis(config, client=local_client)
    assert {s["status"] for s in outcome.steps.values()} == {"reused"}
    # the rerun took the source's digest from its record, not from the file: a planted
    # digest makes the source look changed, and the run converts again; the store made
    # again records the file's true digest (convert hashes what it reads), so its content
    # identity is unchanged and the fit, keyed by that identity, is reused
    planted = {**records[bold.resolve()], "sha256": "0" * 64}
    for entry in folder.glob("*.json"):
        if Path(json.loads(entry.read_text())["stat"][0]) == bold.resolve():
            entry.write_text(json.dumps(planted))
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.steps["convert-sub-01_task-tiny"]["status"] == "ran"
    assert outcome.steps["fit"]["status"] == "reused"
