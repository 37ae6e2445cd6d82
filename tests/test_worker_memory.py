"""glibc malloc thresholds and the pressure valve in the workers bigglm starts
(``bigglm.worker_memory``, set up by ``bigglm.cluster``).

Measured, not mocked: clusters are real LocalClusters with worker processes, and whether a
process runs with the thresholds is seen in its page faults: after a 16 MB array is freed,
allocating and filling another one faults page by page when it is a fresh ``mmap`` and
not at all when malloc's arena serves it from pages already mapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from typing import Any

import cloudpickle
import dask
import pytest

from bigglm.cluster import client_from_profile, jobqueue_options
from bigglm.config import ClusterConfig
from bigglm.worker_memory import (
    MAX_TRIMS,
    THRESHOLD,
    MallocValve,
    job_script_exports,
    relief,
    worker_environ,
)

# Workers cannot import test modules: ship this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MALLOC = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
TUNED = {name: str(THRESHOLD) for name in MALLOC}
VALVE = MallocValve.name

#: Fewest faults of filling a fresh 16 MB mapping: one per 2 MiB page where transparent
#: huge pages serve it, 4,096 with 4 KiB pages. Reused arena pages fault not at all.
FRESH = 8

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def faults() -> int:
    """Fewest minor page faults, over three tries, of filling a 16 MB array after one
    of that size was freed."""
    import resource

    import numpy as np

    counts = []
    for _ in range(4):
        a = np.ones(2 * 2**20)
        del a
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(2 * 2**20)
        del a
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])


def malloc_vars(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    environ = os.environ if environ is None else environ
    return {name: environ.get(name) for name in MALLOC}


def valve_state(dask_worker: Any) -> tuple[bool, bool] | None:
    """(watching, reverted) of the worker's valve; None if it has none."""
    valve = dask_worker.plugins.get(VALVE)
    return None if valve is None else (valve.watching, valve.reverted)


def test_the_valve_trims_above_the_mark_and_reverts_when_a_trim_is_not_enough() -> None:
    limit = 1000
    assert relief(600, limit, trimmed=False) == "none"  # at the mark (0.6) is not above it
    assert relief(601, limit, trimmed=False) == "trim"
    assert relief(500, limit, trimmed=True) == "none"  # the trim was enough
    assert relief(601, limit, trimmed=True) == "revert"
    assert relief(10**12, 0, trimmed=False) == "none"  # no memory limit: nothing to guard
    assert relief(100, limit, trimmed=False, mark=0.05) == "trim"
    # a worker that keeps coming back over the mark gives the thresholds up
    assert relief(601, limit, trimmed=False, trims=MAX_TRIMS - 1) == "trim"
    assert relief(601, limit, trimmed=False, trims=MAX_TRIMS) == "revert"
    assert relief(500, limit, trimmed=False, trims=MAX_TRIMS) == "none"


@glibc
def test_the_thresholds_unless_the_user_set_an_mmap_threshold(monkeypatch: Any) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # what a nanny leaves here
    assert worker_environ() == TUNED
    key = "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_"
    with dask.config.set({key: 262144}):
        assert worker_environ() == {}
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert worker_environ() == {}


@glibc
def test_batch_jobs_export_the_thresholds_before_their_nanny_starts(monkeypatch: Any) -> None:
    from dask_jobqueue import SLURMCluster

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    profile = ClusterConfig(profile="slurm")
    with dask.config.set({"jobqueue.slurm.job-script-prologue": ["module load python"]}):
        options = jobqueue_options(profile)
    assert options["job_script_prologue"] == ["module load python", *job_script_exports(TUNED)]
    script = SLURMCluster(**options).job_script()  # renders the job; submits nothing
    exports = script.index("export MALLOC_TRIM_THRESHOLD_=33554432 MALLOC_MMAP_THRESHOLD_=")
    assert script.index("module load python") < exports < script.index("distributed.cli")
    assert "job_script_prologue" not in jobqueue_options(
        ClusterConfig(profile="slurm", tune_malloc=False)
    )


@glibc
@pytest.mark.parametrize(
    ("own", "expected"),
    [(None, str(THRESHOLD)), ("131072", "131072")],  # a job's own setting is kept
)
def test_the_job_script_lines_set_the_thresholds_in_the_shell(
    own: str | None, expected: str
) -> None:
    (line,) = job_script_exports(TUNED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if own is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = own
    done = subprocess.run(
        ["bash", "-c", f'{line}\necho "$MALLOC_MMAP_THRESHOLD_"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == expected


@glibc
@pytest.mark.cluster
def test_workers_bigglm_starts_run_with_the_thresholds_and_the_valve() -> None:
    before = malloc_vars()
    with client_from_profile(ClusterConfig(n_workers=1, memory_limit="2GiB")) as client:
        (found,) = client.run(malloc_vars).values()
        assert found == TUNED
        (valve,) = client.run(valve_state).values()
        assert valve == (True, False)  # watching, not reverted
        (count,) = client.run(faults).values()
        assert count < FRESH  # the 16 MB buffer reuses mapped pages
        assert malloc_vars() == before  # not this process's
    assert malloc_vars() == before


@glibc
@pytest.mark.cluster
def test_opted_out_workers_keep_distributeds_settings() -> None:
    with client_from_profile(ClusterConfig(n_workers=1), tune_malloc=False) as client:
        (found,) = client.run(malloc_vars).values()
        assert found["MALLOC_MMAP_THRESHOLD_"] is None
        assert found["MALLOC_TRIM_THRESHOLD_"] != str(THRESHOLD)
        assert client.run(valve_state) == {w: None for w in client.run(valve_state)}
        (count,) = client.run(faults).values()
        assert count >= FRESH  # distributed's trim setting: every large buffer is mmapped


@glibc
@pytest.mark.cluster
def test_a_users_mmap_threshold_reaches_the_workers_unchanged(monkeypatch: Any) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    with client_from_profile(ClusterConfig(n_workers=1)) as client:
        (found,) = client.run(malloc_vars).values()
        assert found["MALLOC_MMAP_THRESHOLD_"] == "131072"
        assert found["MALLOC_TRIM_THRESHOLD_"] != str(THRESHOLD)
        (valve,) = client.run(valve_state).values()
        assert valve is None


@glibc
@pytest.mark.cluster
def test_the_valve_gives_the_thresholds_up_when_a_trim_is_not_enough() -> None:
    with client_from_profile(ClusterConfig(n_workers=1, memory_limit="2GiB")) as client:
        (count,) = client.run(faults).values()
        assert count < FRESH
        # replaces bigglm's valve with one whose mark any worker is above; no task runs
        # after this, so only the valve's own checks on the worker's event loop can react
        client.register_plugin(MallocValve(mark=0.0))
        deadline = time.monotonic() + 10
        while client.run(valve_state) != {w: (False, True) for w in client.run(valve_state)}:
            assert time.monotonic() < deadline, client.run(valve_state)
            time.sleep(0.1)
        (count,) = client.run(faults).values()
        assert count >= FRESH  # back to distributed's mmap threshold


THREADED = """
import json, os, resource, sys
import dask
import numpy as np, pandas as pd, xarray as xr
import bigglm

def faults():
    a = np.ones(2 * 2**20); del a  # 16 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(2 * 2**20); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

environ = dict(os.environ)
rng = np.random.default_rng(0)
ds = xr.Dataset({"bold": (("time", "voxel"), rng.normal(size=(40, 64)))})
design = pd.DataFrame({"c": np.ones(40)})
with dask.config.set(scheduler="threads"):
    bigglm.fit(ds.chunk({"time": 20, "voxel": 16}), design).compute()
print(json.dumps({
    "environ": dict(os.environ) == environ,
    "valve": "bigglm.worker_memory" in sys.modules,
    "faults": min(faults() for _ in range(3)),
}))
"""


@glibc
def test_a_fit_under_the_threaded_scheduler_changes_nothing_in_the_calling_process() -> None:
    # a process started as distributed starts its workers, so that its mmap threshold is
    # fixed: a mallopt from the fit would show as 16 MB buffers that stop faulting
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(THREADED)],
        env={**env, "MALLOC_TRIM_THRESHOLD_": "65536"},
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["environ"] is True
    assert found["valve"] is False
    assert found["faults"] >= FRESH
