"""bigglm on a real SLURM: Dask workers that are SLURM jobs, and ``bigglm submit`` end to end.

Needs a running controller (``.ci/slurm-up``, which ``.ci/run`` calls as root). Locally
the tests are skipped with the reason when ``sinfo`` is missing or no node answers; in CI
(``CI=true``) a missing SLURM is a failure, never a skip.

Every result is compared with a local run of the same analysis: the statistics must agree
to 1e-12 of each map's largest magnitude (the same graph on the same data; only BLAS
alignment paths may differ by a few ulps between processes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from bigglm.config import parse_config
from bigglm.pipeline import run_analysis

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _slurm_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found: SLURM is not installed (as root: bash .ci/slurm-up)"
    done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False)
    states = done.stdout.split()
    if done.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        return f"no SLURM node is up (sinfo: {done.stdout.strip() or done.stderr.strip()})"
    return None


@pytest.fixture(autouse=True, scope="module")
def _slurm_running() -> None:
    problem = _slurm_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the SLURM tests, but {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def local_reference(
    tmp_path_factory: pytest.TempPathFactory,
    make_tiny_bids: Any,
    tiny_config: Any,
    local_client: Any,
) -> tuple[Path, Path]:
    """A two-subject dataset (on the shared filesystem) and its local-cluster results."""
    root = tmp_path_factory.mktemp("slurm")
    dataset = make_tiny_bids(root / "dataset")
    reference = root / "local"
    run_analysis(parse_config(tiny_config(dataset, reference)), client=local_client)
    return dataset, reference


def _maps(folder: Path) -> dict[str, np.ndarray]:
    return {
        p.name: np.asarray(nib.load(p).dataobj)
        for p in sorted(folder.rglob("*_statmap.nii.gz"))
        if ".bigglm" not in p.parts
    }


def _assert_same_maps(reference: Path, other: Path, subjects: int = 2) -> None:
    left, right = _maps(reference), _maps(other)
    assert sorted(right) == sorted(left) and len({n.split("_")[0] for n in left}) == subjects
    for name, values in left.items():
        scale = float(np.nanmax(np.abs(values)))
        np.testing.assert_allclose(
            right[name], values, rtol=1e-12, atol=1e-12 * scale, equal_nan=True, err_msg=name
        )


def _slurm_cluster(logs: Path) -> dict[str, Any]:
    return {
        "profile": "slurm",
        "jobs": 1,
        "cores": 1,
        "memory": "1GB",
        "walltime": "00:20:00",
        "log_directory": str(logs),
        "submit": {"cores": 1, "memory": "1GB", "walltime": "00:20:00"},
    }


def test_fit_with_workers_that_are_slurm_jobs_matches_local(
    local_reference: tuple[Path, Path], tiny_config: Any, tmp_path: Path
) -> None:
    from bigglm.cluster import client_from_profile

    dataset, reference = local_reference
    config = parse_config(
        tiny_config(dataset, tmp_path / "out", cluster=_slurm_cluster(tmp_path / "logs"))
    )
    with client_from_profile(config.cluster) as client:
        job_ids = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        assert job_ids and all(job_ids.values()), job_ids  # every worker runs inside a job
        run_analysis(config, client=client)
    _assert_same_maps(reference, tmp_path / "out")


def _wait_for_job(job_id: str, timeout: float = 300.0) -> str:
    """Poll until SLURM reports the job (all its array tasks) finished; return the states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False
        )
        if queued.returncode == 0 and not queued.stdout.strip():
            break
        time.sleep(1.0)
    else:
        subprocess.run(["scancel", job_id], check=False)
        pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s")
    shown = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=False
    )
    return " ".join(re.findall(r"JobState=(\w+)", shown.stdout))


def _submit(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bigglm.cli", "submit", str(config), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    match = re.search(r"submitted job (\d+)", done.stdout)
    assert match, done.stdout
    return match.group(1)


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted(folder.rglob("*.out")))


@pytest.mark.parametrize("mode", ["driver", "array"])
def test_submit_end_to_end_matches_local(
    local_reference: tuple[Path, Path], tiny_config: Any, tmp_path: Path, mode: str
) -> None:
    dataset, reference = local_reference
    out = tmp_path / "out"
    config = tmp_path / "analysis.yaml"
    cluster = _slurm_cluster(tmp_path / "worker-logs")
    config.write_text(yaml.safe_dump(tiny_config(dataset, out, cluster=cluster)))
    job_id = _submit(config, "--mode", mode)
    states = _wait_for_job(job_id)
    assert states and set(states.split()) == {"COMPLETED"}, states + _logs(out / "logs")
    _assert_same_maps(reference, out)
    if mode == "array":  # one task per subject, each on its own local cluster
        assert len(list((out / "logs").glob("bigglm-subject-*.out"))) == 2


def test_submit_dry_run_writes_a_script_only(
    local_reference: tuple[Path, Path], tiny_config: Any, tmp_path: Path
) -> None:
    dataset, _ = local_reference
    config = tmp_path / "analysis.yaml"
    cluster = _slurm_cluster(tmp_path / "logs")
    config.write_text(yaml.safe_dump(tiny_config(dataset, tmp_path / "out", cluster=cluster)))
    done = subprocess.run(
        [sys.executable, "-m", "bigglm.cli", "submit", str(config), "--mode", "array", "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    )
    script = tmp_path / "out" / ".bigglm" / "jobs" / "array.slurm.sh"
    assert f"wrote {script} (2 array tasks); not submitted" in done.stdout
    assert "#SBATCH --array=0-1" in script.read_text()
    checked = subprocess.run(
        ["sbatch", "--test-only", str(script)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr  # SLURM itself accepts the script


@pytest.mark.parametrize("template", ["array_per_subject.sbatch", "driver_with_workers.sbatch"])
def test_workflow_templates_are_accepted_by_sbatch(template: str, tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[1] / "workflows" / template
    small = ["--cpus-per-task=1", "--mem=1G"]  # the test node is smaller than the templates ask
    checked = subprocess.run(
        ["sbatch", "--test-only", "--array=0-1", *small, str(path), "a.yaml", "subjects.txt"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stderr
