"""Cluster profiles: option translation, worker lifetimes, local and address clusters."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigglm.cluster import client_from_profile, jobqueue_options, lifetime_options, local_options
from bigglm.config import ClusterConfig, walltime_seconds
from bigglm.exceptions import ConfigError


@given(st.integers(min_value=300, max_value=7 * 24 * 3600))
def test_workers_retire_before_the_walltime(seconds: int) -> None:
    walltime = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    options = lifetime_options(walltime)
    lifetime = int(options[1].rstrip("s"))
    stagger = int(options[3].rstrip("s"))
    assert options[4] == "--lifetime-restart"
    assert 0 < lifetime and lifetime + stagger < walltime_seconds(walltime)
    assert walltime_seconds(walltime) - lifetime >= 60  # at least a minute to hand work over


def test_too_short_walltime_is_refused() -> None:
    with pytest.raises(ConfigError, match="too short"):
        lifetime_options("00:01:00")


def test_slurm_options_reach_dask_jobqueue() -> None:
    from dask_jobqueue import SLURMCluster

    profile = ClusterConfig(
        profile="slurm",
        cores=4,
        processes=2,
        memory="16GB",
        walltime="02:00:00",
        queue="short",
        account="proj",
        job_extra_directives=["--qos=low"],
    )
    options = jobqueue_options(profile)
    script = SLURMCluster(**options).job_script()  # renders the job; submits nothing
    for line in (
        "#SBATCH -p short",
        "#SBATCH -A proj",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH -t 02:00:00",
        "#SBATCH --qos=low",
        "--lifetime 6480s",
        "--lifetime-stagger 360s",
        "--nworkers 2",
    ):
        assert line in script, line


@pytest.mark.parametrize("kind", ["pbs", "sge"])
def test_pbs_and_sge_scripts_render(kind: str) -> None:
    import dask_jobqueue

    cls = {"pbs": dask_jobqueue.PBSCluster, "sge": dask_jobqueue.SGECluster}[kind]
    profile = ClusterConfig.model_validate(
        {"profile": kind, "queue": "q", "account": "proj", "walltime": "01:00:00"}
    )
    script = cls(**jobqueue_options(profile)).job_script()
    assert "--lifetime 3240s" in script
    assert ("#PBS -A proj" if kind == "pbs" else "#$ -P proj") in script
    assert ("walltime=01:00:00" if kind == "pbs" else "h_rt=01:00:00") in script


def test_local_cluster_is_sized_to_the_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert local_options(ClusterConfig())["n_workers"] == 3
    assert local_options(ClusterConfig(threads_per_worker=3))["n_workers"] == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    for variable in ("NCPUS", "NSLOTS"):
        monkeypatch.delenv(variable, raising=False)
    assert local_options(ClusterConfig())["n_workers"] == len(os.sched_getaffinity(0))


@pytest.mark.cluster
def test_local_profile_starts_and_closes_a_cluster() -> None:
    with client_from_profile(ClusterConfig(n_workers=1)) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        assert len(client.scheduler_info()["workers"]) == 1
    assert client.status == "closed"


@pytest.mark.cluster
def test_address_profile_joins_a_running_scheduler_and_leaves_it_running(local_client: Any) -> None:
    address = local_client.scheduler.address
    with client_from_profile(ClusterConfig(profile="address", address=address)) as client:
        assert client.submit(pow, 2, 10).result() == 1024
    assert local_client.submit(sum, [1, 1]).result() == 2  # still up


def test_unreachable_address_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bigglm.cluster.CONNECT_TIMEOUT", "2s")
    profile = ClusterConfig(profile="address", address="tcp://127.0.0.1:9")
    with pytest.raises(ConfigError, match="cannot reach a Dask scheduler"):
        with client_from_profile(profile):
            pass


def test_batch_profile_without_its_submit_command_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no qsub here
    with pytest.raises(ConfigError, match="qsub is not on PATH"):
        with client_from_profile(ClusterConfig(profile="pbs")):
            pass
