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
import signal
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
    """The first-level maps under an outputs folder (not the group level's)."""
    return {
        p.name: np.asarray(nib.load(p).dataobj)
        for p in sorted(folder.rglob("*_statmap.nii.gz"))
        if ".bigglm" not in p.parts and (folder / "group") not in p.parents
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


def _files_without(secret: str, *folders: Path) -> None:
    """No file under ``folders`` holds a private key or the given key's text."""
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                text = path.read_bytes().decode("utf-8", "replace")
                assert "PRIVATE KEY" not in text and secret not in text, path


def test_fit_with_workers_that_are_slurm_jobs_speaks_tls_and_matches_local(
    local_reference: tuple[Path, Path],
    tiny_config: Any,
    tmp_path: Path,
    foreign_credentials: Any,
    hand_started_worker: Any,
) -> None:
    """The issue's checks on a real SLURM: the fit succeeds over TLS, a client and a
    worker without the run's credentials are refused, the credentials go at the end, and
    no file written outside their folder holds them."""
    from distributed import Client

    from bigglm.cluster import client_from_profile

    dataset, reference = local_reference
    logs, credentials = tmp_path / "logs", tmp_path / "credentials"
    config = parse_config(tiny_config(dataset, tmp_path / "out", cluster=_slurm_cluster(logs)))
    with client_from_profile(config.cluster, credentials=credentials) as client:
        address = client.scheduler.address
        assert address.startswith("tls://")
        job_ids = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        assert job_ids and all(job_ids.values()), job_ids  # every worker runs inside a job
        assert all(worker.startswith("tls://") for worker in job_ids)
        folder = Path(client.security.tls_ca_file).parent
        assert folder.parent == credentials and oct(folder.stat().st_mode & 0o777) == "0o700"
        key = Path(client.security.tls_client_key).read_text().splitlines()[1]
        with pytest.raises(OSError):
            Client(address.replace("tls://", "tcp://"), timeout="5s")
        impostor = foreign_credentials(tmp_path / "impostor", client.security.tls_ca_file)
        for files in (None, impostor):
            assert hand_started_worker(address, files).returncode != 0
        assert len(client.scheduler_info()["workers"]) == len(job_ids)  # none joined
        run_analysis(config, client=client)
    _assert_same_maps(reference, tmp_path / "out")
    assert not folder.exists() and list(credentials.iterdir()) == []
    assert oct(logs.stat().st_mode & 0o777) == "0o700"  # the worker jobs' logs are private
    _files_without(key, tmp_path / "out", logs)


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
    else:  # the driver's SLURM workers had per-run credentials, gone once it finished
        assert list((out / ".bigglm" / "credentials").iterdir()) == []
        assert "tls://" in _logs(out / "logs") + _logs(tmp_path / "worker-logs")
    worker_logs = [tmp_path / "worker-logs"] if mode == "driver" else []
    private = [out / ".bigglm", out / ".bigglm" / "jobs", out / "logs", *worker_logs]
    private += list((out / ".bigglm" / "jobs").glob("*.sh"))
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in private} == {
        p.name: "0o700" for p in private
    }
    _files_without("-----BEGIN", out, *worker_logs)


def test_submit_array_then_the_group_level_after_it(
    local_reference: tuple[Path, Path], tiny_config: Any, tmp_path: Path
) -> None:
    """``--mode array`` with a group section: one task per subject, then the group job,
    held by SLURM until the array succeeded (afterok), fitting both subjects' maps."""
    dataset, reference = local_reference
    out, config = tmp_path / "out", tmp_path / "analysis.yaml"
    cluster = _slurm_cluster(tmp_path / "worker-logs")
    group = {"min_subjects": 2, "inference": {"height_control": None}}
    sections = {"cluster": cluster, "group": group}
    config.write_text(yaml.safe_dump(tiny_config(dataset, out, **sections)))
    done = subprocess.run(
        [sys.executable, "-m", "bigglm.cli", "submit", str(config), "--mode", "array"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    array_id, group_id = re.findall(r"submitted job (\d+)", done.stdout)
    assert f"after job {array_id} succeeds" in done.stdout
    shown = subprocess.run(["scontrol", "show", "job", group_id], capture_output=True, text=True)
    assert f"Dependency=afterok:{array_id}" in shown.stdout or "JobState=COMPLETED" in shown.stdout
    assert set(_wait_for_job(array_id).split()) == {"COMPLETED"}, _logs(out / "logs")
    assert _wait_for_job(group_id) == "COMPLETED", _logs(out / "logs")
    _assert_same_maps(reference, out)  # the first level, as a local run
    effects = np.stack(
        [
            np.asarray(nib.load(p).dataobj, dtype=np.float64)
            for p in sorted(out.glob("sub-*/*_contrast-a_stat-effect_statmap.nii.gz"))
        ]
    )
    t = nib.load(out / "group/contrast-a/group_contrast-mean_stat-t_statmap.nii.gz")
    expected = effects.mean(axis=0) / (effects.std(axis=0, ddof=1) / np.sqrt(2))
    inside = np.isfinite(expected)
    # Compared as 1/t: the one-pass RSS (y'y - b'X'y in float64) has an absolute error
    # of order eps * y'y, so 1/t, proportional to the residual SD, is accurate to ~1e-7
    # absolutely, while t's relative error grows as t^2 (4e-5 at |t| = 2700, reached
    # where the two subjects' effects agree to 4 digits).
    np.testing.assert_allclose(
        1 / np.asarray(t.dataobj)[inside], 1 / expected[inside], rtol=1e-5, atol=1e-6
    )


def _worker_jobs() -> list[str]:
    shown = subprocess.run(
        ["squeue", "-h", "-n", "dask-worker", "-o", "%i"], capture_output=True, text=True
    )
    return shown.stdout.split()


def test_sigterm_cancels_the_worker_jobs_and_removes_the_credentials(
    local_reference: tuple[Path, Path], tiny_config: Any, tmp_path: Path
) -> None:
    """What ``scancel`` of a driver job (or its walltime) does to ``bigglm run``: SIGTERM.
    The run unwinds as after Ctrl-C: one line, the worker jobs cancelled, the key gone."""
    dataset, _ = local_reference
    out, config = tmp_path / "out", tmp_path / "analysis.yaml"
    cluster = _slurm_cluster(tmp_path / "worker-logs")
    config.write_text(yaml.safe_dump(tiny_config(dataset, out, cluster=cluster)))
    assert _worker_jobs() == []  # no other test's workers left
    run = subprocess.Popen(
        [sys.executable, "-m", "bigglm.cli", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _worker_jobs() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the credentials are written and the worker job submitted
    keys = list((out / ".bigglm" / "credentials").glob("bigglm-tls-*/key.pem"))
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert keys and run.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "bigglm run: terminated (SIGTERM)"
    assert "Traceback" not in stderr
    assert not keys[0].exists() and list(keys[0].parent.parent.iterdir()) == []
    for _ in range(60):  # scancel's effect shows in squeue within a few seconds
        if not _worker_jobs():
            break
        time.sleep(0.5)
    assert _worker_jobs() == []


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
