"""glibc malloc thresholds in worker processes (``bigglm._allocator``).

Measured, not mocked: each case runs in a fresh interpreter with the environment a Dask
worker gets, and counts the minor page faults of allocating and filling a 16 MB array
after an array of that size was freed. Served from a fresh ``mmap`` the array faults in
page by page every time; served from malloc's arena it reuses pages already mapped and
does not fault at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr

SCRIPT = """
import json, resource, sys
import numpy as np
from bigglm._allocator import tune

applied = tune() if sys.argv[1] == "tune" else None

def faults():
    a = np.ones(2 * 2**20); del a  # 16 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(2 * 2**20); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
print(json.dumps({"applied": applied, "faults": [faults() for _ in range(3)]}))
"""

#: Fewest faults of filling a fresh 16 MB mapping: one per 2 MiB page where transparent
#: huge pages serve it, 4,096 with 4 KiB pages. Reused arena pages fault not at all.
FRESH = 8

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def _run_script(script: str, *args: str, **env: str) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter with ``env`` as its only malloc settings; its
    JSON output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout))


def _run(mode: str, **env: str) -> dict[str, Any]:
    return _run_script(SCRIPT, mode, **env)


def test_under_distributeds_trim_setting_every_large_buffer_faults_again() -> None:
    # the reason for the module: distributed's MALLOC_TRIM_THRESHOLD_ turns off glibc's
    # adaptive mmap threshold
    untuned = _run("plain", MALLOC_TRIM_THRESHOLD_="65536")
    assert min(untuned["faults"]) >= FRESH


def test_tune_makes_large_buffers_reuse_mapped_pages() -> None:
    tuned = _run("tune", MALLOC_TRIM_THRESHOLD_="65536")
    assert tuned["applied"] is True
    assert tuned["faults"] == [0, 0, 0]


def test_a_users_own_mmap_threshold_is_left_alone() -> None:
    kept = _run("tune", MALLOC_TRIM_THRESHOLD_="65536", MALLOC_MMAP_THRESHOLD_="131072")
    assert kept["applied"] is False
    assert min(kept["faults"]) >= FRESH  # still the user's setting: every buffer is mmapped


def test_a_process_with_glibcs_defaults_is_left_alone() -> None:
    assert _run("tune")["applied"] is False


@pytest.mark.cluster
def test_workers_of_a_fit_run_with_the_thresholds(local_client: Any) -> None:
    import bigglm

    rng = np.random.default_rng(0)
    ds = xr.Dataset({"bold": (("time", "voxel"), rng.normal(size=(40, 64)))})
    chunked = ds.chunk({"time": 20, "voxel": 16})
    bigglm.fit(chunked, pd.DataFrame({"c": np.ones(40)}), client=local_client).compute()

    def state() -> tuple[str | None, bool | None, int]:
        from bigglm import _allocator

        found = _allocator._state
        return (
            os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            None if found is None else found.applied,
            0 if found is None else found.limit,
        )

    reports = local_client.run(state)
    limits = local_client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
    # the workers that computed a chunk (None: this worker ran none of them)
    ran = {w: (applied, limit) for w, (_, applied, limit) in reports.items() if applied is not None}
    assert ran and all(applied and limit == limits[w] > 0 for w, (applied, limit) in ran.items())
    assert all(trim == "65536" for trim, _, _ in reports.values())


PRESSURE_SCRIPT = """
import json, resource
import numpy as np
from bigglm import _allocator

def faults():
    a = np.ones(2 * 2**20); del a  # 16 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(2 * 2**20); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

import psutil
applied = _allocator.tune()
kept = faults()  # retained by malloc: no new pages
state = _allocator._state
state.process = psutil.Process()
state.limit = 10 * psutil.Process().memory_info().rss  # far below the mark: nothing to do
_allocator.tune()
calm = faults()
state.limit = 1  # far above the mark even after a trim: back to distributed's settings
_allocator.tune()
backed_off = (state.applied, state.limit)
out = []
for _ in range(3):  # no more tune() calls: the restored thresholds alone
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(2 * 2**20); del a
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "kept": kept, "calm": calm, "backed_off": backed_off,
                  "pressed": out}))
"""


def test_with_live_data_above_the_mark_the_worker_goes_back_to_distributeds_settings() -> None:
    found = _run_script(PRESSURE_SCRIPT, MALLOC_TRIM_THRESHOLD_="65536")
    assert found["applied"] is True and found["kept"] == 0 and found["calm"] == 0
    assert found["backed_off"] == [False, 0]
    # distributed's mmap threshold again: every 16 MB buffer is a fresh mmap
    assert min(found["pressed"]) >= FRESH


BACK_OFF_SCRIPT = """
import json, resource
import numpy as np
import psutil
from bigglm import _allocator

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(2 * 2**20); del a  # 16 MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = _allocator.tune()
state = _allocator._state
state.process = psutil.Process()
# 240 MB of free memory kept in malloc's arena: blocks under the 32 MiB threshold, freed
# between small blocks that stay, so they are holes, not free space at the arena's top
# (the 1 MB blocks are too large for any earlier hole, so each follows its 24 MB block)
held = [(np.ones(3 * 2**20), np.ones(2**17)) for _ in range(10)]
pins = [small for _, small in held]
del held
kept = state.process.memory_info().rss
# the mark sits between the live data and live data + kept memory: a trim is enough
state.limit = int((kept - 120 * 2**20) / _allocator.PRESSURE)
_allocator.tune()
trimmed = state.process.memory_info().rss
still = (state.applied, faults(), faults())
print(json.dumps({"applied": applied, "kept": kept, "trimmed": trimmed, "still": still}))
"""


def test_pressure_that_a_trim_relieves_keeps_the_thresholds() -> None:
    found = _run_script(BACK_OFF_SCRIPT, MALLOC_TRIM_THRESHOLD_="65536")
    assert found["applied"] is True
    assert found["kept"] - found["trimmed"] > 200 * 2**20  # the kept memory went back
    applied, _, second = found["still"]
    assert applied is True and second == 0  # still tuned: the 16 MB buffer is reused


@pytest.mark.cluster
def test_a_worker_is_watched_between_tasks() -> None:
    # a paused worker starts no tasks: the valve also runs on the worker's event loop
    import time

    from distributed import Client, LocalCluster

    import bigglm
    from bigglm import _allocator

    rng = np.random.default_rng(1)
    ds = xr.Dataset({"bold": (("time", "voxel"), rng.normal(size=(40, 64)))})
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, memory_limit="2GiB", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        bigglm.fit(
            ds.chunk({"time": 20}), pd.DataFrame({"c": np.ones(40)}), client=client
        ).compute()

        def watched(dask_worker: Any) -> tuple[bool, bool, int]:
            state = _allocator._state
            assert state is not None
            running = dask_worker.periodic_callbacks["bigglm-malloc-trim"].is_running()
            return running, state.applied, state.limit

        (before,) = client.run(watched).values()
        assert before[0] is True and before[1] is True and before[2] == 2 * 2**30

        def press() -> None:  # no task runs after this: only the watch can react
            assert _allocator._state is not None
            _allocator._state.limit = 1

        client.run(press)
        time.sleep(4 * _allocator.WATCH_MS / 1000)
        (after,) = client.run(watched).values()
        assert after[1] is False and after[2] == 0
