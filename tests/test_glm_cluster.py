"""The fit on a real LocalCluster with worker processes: the same numbers as in-process
whatever the number of workers, and when a worker process is killed mid-fit.

Tolerance 1e-12 (the brief's): the reduction tree is fixed by the chunking, not by the
scheduling, so the sums are added in the same order wherever the tasks run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import dask
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import bigglm

pytestmark = pytest.mark.cluster

# Workers cannot import test modules: ship this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHAPE = (8, 6, 5)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """Two single-threaded worker processes (started and closed by this module)."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A converted store of 240 voxels x 70 scans, chunked 25 x 40 (3 x 6 chunks)."""
    tmp = tmp_path_factory.mktemp("cluster")
    rng = np.random.default_rng(4)
    n_scans = 70
    t = np.arange(n_scans)
    design = pd.DataFrame({"a": (t // 7 % 2).astype(float), "b": np.sin(t / 5), "constant": 1.0})
    n_vox = int(np.prod(SHAPE))
    noise = rng.normal(size=(n_scans, n_vox))
    noise[1:] += 0.3 * noise[:-1]
    y = 1000 + design.to_numpy() @ rng.normal(size=(3, n_vox)) + noise
    img = nib.Nifti1Image(y.T.reshape(*SHAPE, n_scans).astype(np.float32), np.eye(4))
    img.header.set_zooms((1.0, 1.0, 1.0, 2.0))
    nib.save(img, tmp / "bold.nii.gz")
    mask = np.ones(SHAPE, bool)
    path = bigglm.convert(
        tmp / "bold.nii.gz", tmp / "bold.zarr", mask=mask, time_chunk=25, voxel_chunk=40
    )
    return path, design


def in_process(store: tuple[Path, pd.DataFrame], noise: str) -> bigglm.GLMResult:
    with dask.config.set(scheduler="synchronous"):
        return bigglm.fit(store[0], store[1], noise=noise).compute()


def assert_same(a: bigglm.GLMResult, b: bigglm.GLMResult) -> None:
    for name in ("beta", "sigma2"):
        np.testing.assert_allclose(a.dataset[name].values, b.dataset[name].values, rtol=1e-12)
    if "ar" in a.dataset:
        np.testing.assert_allclose(a.ar.values, b.ar.values, rtol=1e-12)
    za, zb = a.contrast("a - b")["z"].values, b.contrast("a - b")["z"].values
    np.testing.assert_allclose(za, zb, rtol=1e-12)


@pytest.mark.parametrize("noise", ["ols", "ar2"])
def test_cluster_and_any_number_of_local_workers_agree(
    client: Client, store: tuple, noise: str
) -> None:
    reference = in_process(store, noise)
    assert_same(bigglm.fit(store[0], store[1], noise=noise, client=client).compute(), reference)
    for workers in (1, 2, 4):
        with dask.config.set(scheduler="threads", num_workers=workers):
            assert_same(bigglm.fit(store[0], store[1], noise=noise).compute(), reference)


def slow(block: np.ndarray) -> np.ndarray:
    """Make each chunk take a while, so a worker can be killed mid-fit."""
    time.sleep(0.25)
    return block


@pytest.mark.slow
def test_killing_a_worker_mid_fit_changes_nothing(client: Client, store: tuple) -> None:
    reference = in_process(store, "ar1")
    ds = bigglm.open_run(store[0])
    ds = ds.assign(bold=ds["bold"].copy(data=ds["bold"].data.map_blocks(slow, dtype=np.float32)))
    result = bigglm.fit(ds, store[1], noise="ar1", client=client)
    started = threading.Event()
    outcome: dict[str, object] = {}

    def report(done: int, total: int) -> None:
        started.set()
        outcome["last"] = (done, total)

    worker = threading.Thread(
        target=lambda: outcome.setdefault("result", result.compute(progress=report))
    )
    worker.start()
    assert started.wait(60), "no voxel block finished"
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    os.kill(pids[victim], signal.SIGKILL)  # a worker process this module's cluster started
    done_at_kill, total = outcome["last"]  # type: ignore[misc]
    assert done_at_kill < total  # the fit was still running
    worker.join(120)
    assert not worker.is_alive()
    assert outcome["last"] == (6, 6)
    assert_same(outcome["result"], reference)  # type: ignore[arg-type]
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker
    assert victim not in client.run(os.getpid) or client.run(os.getpid)[victim] != pids[victim]


def test_a_wide_design_fits_on_a_cluster_without_a_large_graph_warning(
    client: Client,
) -> None:
    # 2,400 scans x 220 columns: the design's terms are ~13 MB, above distributed's 10 MB
    # warning threshold; they are one task of the graph, which is what the warning advises
    rng = np.random.default_rng(5)
    n_scans, n_cols = 2400, 220
    design = pd.DataFrame(
        rng.normal(size=(n_scans, n_cols)), columns=[f"c{i}" for i in range(n_cols)]
    )
    design["c0"] = 1.0
    bold = design.to_numpy() @ rng.normal(size=(n_cols, 12)) + rng.normal(size=(n_scans, 12))
    data = xr.Dataset({"bold": (("time", "voxel"), bold)}).chunk({"time": 600, "voxel": 6})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_cluster = bigglm.fit(data, design, client=client).compute()
    assert not [w for w in caught if "large graph" in str(w.message)]
    expected = np.linalg.lstsq(design.to_numpy(), bold, rcond=None)[0]
    np.testing.assert_allclose(on_cluster.beta.values, expected, rtol=1e-8, atol=1e-10)
