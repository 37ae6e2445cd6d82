"""Shared fixtures: real NIfTI files from nibabel's test data and generated series."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel
import pytest

NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


@pytest.fixture(scope="session")
def functional_nii() -> Path:
    """nibabel's small real 4D fMRI series (uncompressed)."""
    return NIBABEL_DATA / "functional.nii"


@pytest.fixture(scope="session")
def example4d_niigz() -> Path:
    """nibabel's small real 4D series (gzip-compressed, int16 with scaling)."""
    return NIBABEL_DATA / "example4d.nii.gz"


# --- ingest (bigglm.io) ------------------------------------------------------------


def _brain_series(shape: tuple[int, int, int], n_volumes: int, seed: int):
    """A synthetic EPI-like series: a bright noisy ellipsoid on a dark noisy background."""
    import numpy as np

    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape, dtype=float)[:, None, None, None] - 1) / 2
    radius = np.array(shape, dtype=float)[:, None, None, None] * 0.35
    inside = (((grid - centre) / radius) ** 2).sum(axis=0) <= 1.0
    baseline = np.where(inside, 1000.0, 30.0)
    noise = rng.normal(0.0, 1.0, (*shape, n_volumes)) * np.where(inside, 20.0, 10.0)[..., None]
    return (baseline[..., None] + noise).astype(np.float32)


@pytest.fixture
def write_nifti(tmp_path: Path):
    """Factory: write an array as NIfTI in ``tmp_path`` with a given affine, TR and type.

    Float data saved with an integer ``dtype`` get nibabel's own scl_slope/scl_inter.
    """
    import numpy as np

    def write(
        data,
        name: str = "bold.nii",
        *,
        affine=None,
        tr: float | None = 2.0,
        time_unit: str = "sec",
        dtype=None,
    ) -> Path:
        affine = np.diag([3.0, 3.0, 3.5, 1.0]) if affine is None else affine
        img = nibabel.Nifti1Image(np.asarray(data), affine)
        if dtype is not None:
            img.set_data_dtype(dtype)
        img.header.set_xyzt_units("mm", time_unit)
        if tr is not None and np.ndim(data) == 4:
            img.header["pixdim"][4] = tr
        path = tmp_path / name
        nibabel.save(img, path)
        return path

    return write


@pytest.fixture
def brain_series():
    """Factory: ``brain_series(shape, n_volumes, seed)`` float32 EPI-like data."""
    return _brain_series


# --- workflows (issue 5): a tiny fMRIPrep-like dataset and a shared local cluster -------------


def write_tiny_bids(
    root: Path,
    subjects: tuple[str, ...] = ("01", "02"),
    *,
    n_scans: int = 60,
    shape: tuple[int, int, int] = (10, 10, 10),
    tr: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write a small derivatives dataset: bold, brain mask, confounds, events, sidecar.

    Each subject has one run of task ``tiny`` with conditions ``a`` and ``b`` (blocks),
    AR(1) noise (rho 0.3), and a true effect of ``a`` in the first half of the volume.
    Events are written in a separate raw folder (``root/raw``), as in a real dataset.
    """
    import json

    import numpy as np
    import pandas as pd

    from bigglm.design import frame_times, make_design

    rng = np.random.default_rng(seed)
    derivatives = root / "derivatives"
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    events = pd.DataFrame(
        {
            "onset": np.arange(4.0, n_scans * tr - 20, 20.0),
            "duration": 8.0,
        }
    )
    events["trial_type"] = ["a", "b"] * (len(events) // 2) + ["a"] * (len(events) % 2)
    design = make_design(frame_times(n_scans, tr), events, drift=None)
    mask = np.zeros(shape, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    for sub in subjects:
        func = derivatives / f"sub-{sub}" / "func"
        raw_func = root / "raw" / f"sub-{sub}" / "func"
        func.mkdir(parents=True)
        raw_func.mkdir(parents=True)
        stem = f"sub-{sub}_task-tiny"
        effect = np.zeros(shape)
        effect[: shape[0] // 2] = 3.0
        noise = np.empty((n_scans, *shape))
        noise[0] = rng.standard_normal(shape)
        for t in range(1, n_scans):
            noise[t] = 0.3 * noise[t - 1] + np.sqrt(1 - 0.09) * rng.standard_normal(shape)
        signal = 500.0 + design["a"].to_numpy()[:, None, None, None] * effect + noise
        data = np.moveaxis(signal, 0, -1).astype(np.float32)
        image = nibabel.Nifti1Image(data, affine)
        image.header.set_xyzt_units("mm", "sec")
        image.header["pixdim"][4] = tr
        nibabel.save(image, func / f"{stem}_desc-preproc_bold.nii.gz")
        nibabel.save(
            nibabel.Nifti1Image(mask.astype(np.uint8), affine),
            func / f"{stem}_desc-brain_mask.nii.gz",
        )
        (func / f"{stem}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": tr}))
        confounds = pd.DataFrame(
            {"trans_x": rng.normal(0, 0.1, n_scans), "rot_x": rng.normal(0, 0.01, n_scans)}
        )
        confounds.loc[0, "rot_x"] = np.nan  # fMRIPrep leaves n/a in derivative-like columns
        confounds.to_csv(
            func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a"
        )
        events.to_csv(raw_func / f"{stem}_events.tsv", sep="\t", index=False)
    return root


@pytest.fixture(scope="session")
def make_tiny_bids() -> Callable[..., Path]:
    """``make_tiny_bids(root, subjects=..., n_scans=...)``: see write_tiny_bids."""
    return write_tiny_bids


@pytest.fixture
def tiny_bids(tmp_path: Path) -> Path:
    """A two-subject fMRIPrep-like dataset (10 x 10 x 10, 60 volumes); see write_tiny_bids."""
    return write_tiny_bids(tmp_path / "dataset")


@pytest.fixture
def tiny_store(tiny_bids: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Subject 01's run of the tiny dataset converted to ``tmp_path/run.zarr`` (with its
    brain mask), and its events file."""
    import bigglm

    func = tiny_bids / "derivatives/sub-01/func"
    store = bigglm.convert(
        func / "sub-01_task-tiny_desc-preproc_bold.nii.gz",
        tmp_path / "run.zarr",
        mask=func / "sub-01_task-tiny_desc-brain_mask.nii.gz",
    )
    return store, tiny_bids / "raw/sub-01/func/sub-01_task-tiny_events.tsv"


def _tiny_config(
    dataset: Path, outputs: Path, *, report: bool = False, **sections: object
) -> dict[str, Any]:
    """The configuration mapping of an analysis of :func:`write_tiny_bids` data.

    Without the HTML reports unless ``report`` (their template views take seconds per
    contrast; the reports are tested where they are asked for, e.g. test_report_browser).
    """
    config: dict[str, Any] = {
        "inputs": {
            "bids": {"derivatives": str(dataset / "derivatives"), "raw": str(dataset / "raw")},
            "confounds": ["trans_x", "rot_x"],
        },
        "model": {"noise": "ar1", "hrf": "glover", "drift": "cosine"},
        "contrasts": {"a": "a", "a_minus_b": "a - b", "any": ["a", "b"]},
        "outputs": {
            "folder": str(outputs),
            "maps": ["effect", "variance", "stat", "z"],
            "report": report,
        },
        "store": {"time_chunk": 16},
    }
    config.update(sections)
    return config


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., dict[str, Any]]:
    """``tiny_config(dataset, outputs, **sections)``: an analysis of write_tiny_bids data."""
    return _tiny_config


@pytest.fixture
def threads_scheduler() -> Iterator[None]:
    """Compute with threads in this process, even if an earlier test left a distributed
    client registered as Dask's default (fit(client=None) would otherwise use it).

    Modules whose tests compute without a client use it for every test:
    ``pytestmark = pytest.mark.usefixtures("threads_scheduler")``.
    """
    import dask

    with dask.config.set(scheduler="threads"):
        yield


@pytest.fixture(scope="session")
def local_client():
    """One LocalCluster (two single-threaded worker processes) shared by the workflow tests.

    Tests pass it explicitly; it is not made Dask's default scheduler, so tests that
    compute without a client (and must stay in-process) are unaffected by it.
    """
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


def _statmaps(folder: Path) -> dict[str, Any]:
    """Every statistical map under ``folder`` (not in the state folder), by file name."""
    import numpy as np

    return {
        p.name: np.asarray(nibabel.load(p).dataobj)
        for p in sorted(folder.rglob("*_statmap.nii.gz"))
        if ".bigglm" not in p.parts
    }


def _assert_same_maps(a: Path, b: Path) -> None:
    """Same files, same NaN voxels, values equal to 1e-12 of each map's largest magnitude.

    Not bitwise: two fits in different processes may differ by a few ulps, because BLAS
    and numpy's SIMD reductions take alignment-dependent paths (observed: <= 6e-15
    absolute on maps of magnitude ~10).
    """
    import numpy as np

    left, right = _statmaps(a), _statmaps(b)
    assert sorted(left) == sorted(right) and left
    for name in left:
        scale = float(np.nanmax(np.abs(left[name])))
        np.testing.assert_allclose(
            left[name], right[name], rtol=1e-12, atol=1e-12 * scale, equal_nan=True, err_msg=name
        )


@pytest.fixture(scope="session")
def assert_same_maps() -> Callable[[Path, Path], None]:
    """``assert_same_maps(a, b)``: the statistical maps under two outputs folders agree."""
    return _assert_same_maps


def _foreign_credentials(folder: Path, trusted_ca: str) -> dict[str, str]:
    """A certificate and key from another authority, as files in ``folder``, with the
    cluster's own CA file: an impostor that trusts the scheduler but is not of the run."""
    from distributed import Security

    other = Security.temporary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_text(other.tls_client_cert)
    (folder / "key.pem").write_text(other.tls_client_key)
    return {"ca": trusted_ca, "cert": str(folder / "cert.pem"), "key": str(folder / "key.pem")}


@pytest.fixture(scope="session")
def foreign_credentials() -> Callable[[Path, str], dict[str, str]]:
    """``foreign_credentials(folder, ca_file)``: files ``ca``, ``cert``, ``key`` of an impostor."""
    return _foreign_credentials


def _hand_started_worker(address: str, credentials: dict[str, str] | None) -> Any:
    """Run ``dask worker ADDRESS`` (with the given TLS files, if any) until it gives up
    (``--death-timeout 6``); return the finished process."""
    import subprocess
    import sys

    command = [str(Path(sys.executable).with_name("dask")), "worker", address, "--no-nanny"]
    if credentials is not None:
        command += ["--tls-ca-file", credentials["ca"], "--tls-cert", credentials["cert"]]
        command += ["--tls-key", credentials["key"]]
    return subprocess.run(
        [*command, "--death-timeout", "6"], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="session")
def hand_started_worker() -> Callable[[str, dict[str, str] | None], Any]:
    """``hand_started_worker(address, credentials)``: a ``dask worker`` run to its end."""
    return _hand_started_worker
