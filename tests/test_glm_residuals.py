"""GLMResult.residuals and write_residuals: numbers, laziness, memory bounds, outputs.

References, written plainly here:

* OLS: ``y - X @ lstsq(X, y)`` per voxel.
* AR(p): per voxel, Yule–Walker on its OLS residuals, the whitening matrix
  ``W = inv(cholesky(Gamma_T))`` built from its own coefficients (statsmodels'
  ``arma_acovf``), GLS betas by lstsq on ``(W X, W y)``; raw residuals ``y - X b``,
  whitened ``W y - W X b``.

Tolerance 1e-6 relative to each reference's largest magnitude (the brief's; bigglm
stores float32, whose rounding is 6e-8 relative). Against nilearn (OLS): 1e-5, as the
other nilearn comparisons. For AR(1) nilearn's residuals are ``Y - (W X) b`` (nilearn
issue #2964): we show that, and test what can be compared honestly (see the tests).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import dask.array as da
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.signal
import xarray as xr
from ar_simulation import as_run, simulate, yule_walker
from dask.core import get_deps
from statsmodels.tsa.arima_process import arma_acovf

import bigglm
from bigglm.config import parse_config
from bigglm.exceptions import ConfigError, DesignError, StoreError
from bigglm.glm import GLMResult
from bigglm.glm.ar import whiten

pytestmark = pytest.mark.usefixtures("threads_scheduler")


RTOL = 1e-6
SHAPE = (6, 5, 4)
TR = 2.0


def brute_force_residuals(x: np.ndarray, y: np.ndarray, order: int) -> dict[str, np.ndarray]:
    """Per voxel: OLS, Yule–Walker, its own whitening matrix, GLS, both residuals."""
    n = len(x)
    raw, white = [], []
    for v in range(y.shape[1]):
        yv = y[:, v].astype(np.float64)
        b = np.linalg.lstsq(x, yv, rcond=None)[0]
        w = np.eye(n)
        if order:
            phi = yule_walker(yv - x @ b, order)
            cov = scipy.linalg.toeplitz(arma_acovf(np.r_[1, -phi], [1], nobs=n))
            w = np.linalg.inv(np.linalg.cholesky(cov))  # w' w = cov^-1
            b = np.linalg.lstsq(w @ x, w @ yv, rcond=None)[0]
        raw.append(yv - x @ b)
        white.append(w @ yv - w @ x @ b)
    return {"raw": np.array(raw).T, "whitened": np.array(white).T}


def assert_close(actual: Any, expected: np.ndarray, rtol: float = RTOL) -> None:
    """Equal to ``rtol`` of the reference's largest magnitude, NaN where it is NaN."""
    scale = float(np.nanmax(np.abs(expected)))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=rtol * scale)


# --- numbers -------------------------------------------------------------------------


def test_ols_residuals_match_lstsq() -> None:
    design, y = simulate()
    result = bigglm.fit(as_run(y), design, noise="ols")
    e = result.residuals()
    assert e.dims == ("time", "voxel") and e.dtype == np.float32
    assert isinstance(e.data, da.Array) and e.data.chunks == ((32, 32, 32), (10, 10, 4))
    expected = brute_force_residuals(design.to_numpy(), y, 0)["raw"]
    assert_close(e.values, expected)
    assert_close(result.residuals(whitened=True).values, expected)  # OLS: the same


@pytest.mark.parametrize("phi", [(0.4,), (0.5, -0.2)], ids=["ar1", "ar2"])
def test_ar_residuals_match_per_voxel_whitening_matrix(phi: tuple[float, ...]) -> None:
    order = len(phi)
    design, y = simulate(phi=phi, seed=order)
    result = bigglm.fit(as_run(y, (20, 7)), design, noise=f"ar{order}")
    expected = brute_force_residuals(design.to_numpy(), y, order)
    assert_close(result.residuals().values, expected["raw"])
    whitened = result.residuals(whitened=True).values
    assert_close(whitened, expected["whitened"])
    # the whitened residuals are those of the fit: their energy is sigma2 * dof
    energy = (whitened.astype(np.float64) ** 2).sum(axis=0)
    np.testing.assert_allclose(energy, result.sigma2.values * float(result.dof), rtol=1e-5)


def test_time_chunks_shorter_than_the_ar_order() -> None:
    """AR(3) on 2-scan chunks: the 3 scans before a chunk span two chunks above it."""
    design, y = simulate(phi=(0.3, 0.1, 0.1), n_vox=6, seed=9)
    result = bigglm.fit(as_run(y, (2, 4)), design, noise="ar3")
    expected = brute_force_residuals(design.to_numpy(), y, 3)["whitened"]
    assert_close(result.residuals(whitened=True).values, expected)


@pytest.mark.parametrize("noise", ["ols", "ar1", "ar2"])
def test_residuals_do_not_depend_on_the_chunking(noise: str) -> None:
    design, y = simulate(phi=(0.4, 0.1), n_vox=17, seed=4)
    reference = bigglm.fit(as_run(y, (96, 17)), design, noise=noise)
    for chunks in [(1, 17), (7, 3), (33, 5), (50, 16)]:
        other = bigglm.fit(as_run(y, chunks), design, noise=noise)
        for whitened in (False, True):
            assert_close(
                other.residuals(whitened=whitened).values,
                reference.residuals(whitened=whitened).values.astype(np.float64),
                rtol=1e-7,
            )


@pytest.mark.parametrize("noise", ["ols", "ar1"])
def test_voxels_that_are_not_ok_are_nan(noise: str) -> None:
    design, y = simulate(n_vox=10)
    y[:, [2, 7]] = np.float32(1234.5)
    result = bigglm.fit(as_run(y, (30, 4)), design, noise=noise)
    for whitened in (False, True):
        e = result.residuals(whitened=whitened).values
        assert np.isnan(e[:, [2, 7]]).all()
        assert np.isfinite(np.delete(e, [2, 7], axis=1)).all()


# --- laziness, one chunk per task ---------------------------------------------------


class CountingArray:
    """An array that counts how many times it is read."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.reads = 0
        self._lock = threading.Lock()

    def __getitem__(self, key: Any) -> np.ndarray:
        with self._lock:
            self.reads += 1
        return self.data[key]


def test_residuals_are_lazy_and_each_task_reads_one_chunk_and_p_rows() -> None:
    """The memory bound, read off the graph: an output task depends on its own chunk and
    on the p scans above it, which come from a separate read of the chunk above; every
    data chunk has that one task as its only dependent, so none waits in memory for the
    next row of chunks, whatever the order the scheduler runs the rows in."""
    design, y = simulate(phi=(0.4, 0.1))
    source = CountingArray(y)
    bold = da.from_array(source, chunks=(20, 8), name="bold-data")
    run = xr.Dataset({"bold": (("time", "voxel"), bold)})
    result = bigglm.fit(run, design, noise="ar2").compute()
    reads = source.reads
    e = result.residuals(whitened=True)
    assert source.reads == reads  # nothing read until computed
    graph = dict(e.data.__dask_graph__())
    dependencies, dependents = get_deps(graph)
    bold_name = "bold-data"  # the data's chunks; their clone's are "bold-data-<token>"

    def chunks_read(key: Any) -> set[Any]:
        """The data chunks an output task depends on (directly or through a context task)."""
        found: set[Any] = set()
        stack = list(dependencies[key])
        while stack:
            dep = stack.pop()
            if isinstance(dep, tuple) and len(dep) == 3 and dep[0].startswith(bold_name):
                found.add((dep[0] == bold_name, *dep[1:]))
            else:
                stack.extend(dependencies[dep])
        return found

    for i in range(5):
        for j in range(3):
            own = {(True, i, j)}
            assert chunks_read((e.data.name, i, j)) == (own | {(False, i - 1, j)} if i else own)
            assert dependents[(bold_name, i, j)] == {(e.data.name, i, j)}
    e.values  # noqa: B018
    assert source.reads > reads


def test_nifti_writer_computes_each_chunk_once(tmp_path: Path) -> None:
    """A dask series is written one row of chunks at a time: no chunk is computed twice."""
    mask = np.ones((4, 3, 2), bool)
    nib.save(nib.Nifti1Image(np.zeros((4, 3, 2, 3), np.float32), np.eye(4)), tmp_path / "b.nii")
    like = bigglm.open_run(bigglm.convert(tmp_path / "b.nii", tmp_path / "b.zarr", mask=mask))
    calls: list[tuple[int, int]] = []
    lock = threading.Lock()

    def block(block_info: Any = None) -> np.ndarray:
        info = block_info[None]
        with lock:
            calls.append(tuple(info["chunk-location"]))
        return np.full(info["chunk-shape"], float(len(calls)), dtype=np.float32)

    series = da.map_blocks(block, chunks=((7, 7, 6), (10, 14)), dtype=np.float32)
    bigglm.to_nifti(series, like, tmp_path / "series.nii.gz")
    assert sorted(calls) == [(i, j) for i in range(3) for j in range(2)]


# --- nilearn ------------------------------------------------------------------------


def write_nifti_run(tmp: Path, n_scans: int = 80, seed: int = 0) -> tuple[Path, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    t = np.arange(n_scans)
    design = pd.DataFrame(
        {
            "faces": (t // 8 % 2 == 0).astype(float),
            "drift": np.cos(np.pi * (t + 0.5) / n_scans),
            "constant": 1.0,
        }
    )
    n_vox = int(np.prod(SHAPE))
    phi = rng.uniform(0.1, 0.6, size=n_vox)
    white = rng.normal(size=(n_scans, n_vox))
    noise = np.column_stack(
        [scipy.signal.lfilter([1], [1, -p], w) for p, w in zip(phi, white.T, strict=True)]
    )
    y = 800.0 + design.to_numpy() @ (rng.normal(size=(3, n_vox)) * [[2.0], [3.0], [0.0]]) + noise
    img = nib.Nifti1Image(y.T.reshape(*SHAPE, n_scans).astype(np.float32), np.diag([3.0] * 3 + [1]))
    img.header.set_zooms((3.0, 3.0, 3.0, TR))
    path = tmp / "bold.nii.gz"
    nib.save(img, path)
    return path, design


@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("residuals")
    bold, design = write_nifti_run(tmp)
    mask = np.zeros(SHAPE, bool)
    mask[1:5, 1:4, :] = True
    mask[2, 2, 0] = False
    mask_path = tmp / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.diag([3.0] * 3 + [1])), mask_path)
    store = bigglm.convert(bold, tmp / "run.zarr", mask=mask_path, time_chunk=24, voxel_chunk=13)
    return {"bold": bold, "design": design, "mask": mask, "mask_path": mask_path, "store": store}


def nilearn_model(run: dict[str, Any], noise: str) -> Any:
    from nilearn.glm.first_level import FirstLevelModel

    model = FirstLevelModel(
        noise_model=noise, signal_scaling=False, mask_img=run["mask_path"], minimize_memory=False
    )
    return model.fit(run["bold"], design_matrices=run["design"])


def _nilearn_residuals(model: Any) -> Any:
    """A fitted FirstLevelModel's residual images (``residuals_`` from nilearn 0.14 on,
    ``residuals`` before)."""
    return model.residuals_ if hasattr(model, "residuals_") else model.residuals


@pytest.mark.filterwarnings("ignore:.*Generation of a mask has been requested")
def test_ols_residuals_match_nilearn(nifti_run: dict[str, Any]) -> None:
    model = nilearn_model(nifti_run, "ols")
    expected = np.asarray(_nilearn_residuals(model)[0].get_fdata())[nifti_run["mask"]].T
    got = bigglm.fit(nifti_run["store"], nifti_run["design"]).residuals().values
    assert_close(got, expected, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*Generation of a mask has been requested")
def test_ar1_residuals_against_nilearn(nifti_run: dict[str, Any]) -> None:
    """nilearn's AR(1) residuals are ``Y - (W X) b``, raw data minus the whitened design's
    prediction (nilearn issue #2964), which bigglm does not copy. What can be compared:

    1. that this is what nilearn returns (its binned coefficient, w_1 = x_1), to 1e-5;
    2. bigglm's whitening convention against nilearn's own whitened residuals: applying
       :func:`bigglm.glm.ar.whiten` with nilearn's coefficient to nilearn's ``Y - X b``
       gives nilearn's whitened residuals on every scan but the first (1e-5), and the
       first differs by exactly the Prais–Winsten factor ``sqrt(1 - r^2)``;
    3. bigglm's raw residuals against ``Y - X b`` with nilearn's betas: the same up to
       ``X (b - b_nilearn)``, the effect on the betas of nilearn's 0.01 bins and first scan.
    """
    model = nilearn_model(nifti_run, "ar1")
    mask = nifti_run["mask"]
    x = nifti_run["design"].to_numpy()
    y = bigglm.open_run(nifti_run["store"])["bold"].values.astype(np.float64)
    labels, results = model.labels_[0], model.results_[0]
    rho = np.array([float(label) for label in labels])
    beta_nl = np.zeros((x.shape[1], y.shape[1]))
    white_nl = np.zeros_like(y)
    for label, fitted in results.items():
        beta_nl[:, labels == label] = fitted.theta
        white_nl[:, labels == label] = fitted.whitened_residuals
    # 1. nilearn's residuals: Y - (W X) b with its binned rho and unscaled first row
    nilearn_resid = np.asarray(_nilearn_residuals(model)[0].get_fdata())[mask].T
    mixed = np.empty_like(y)
    for v in range(y.shape[1]):
        w = np.eye(len(x)) - rho[v] * np.eye(len(x), k=-1)
        mixed[:, v] = y[:, v] - w @ x @ beta_nl[:, v]
    assert_close(nilearn_resid, mixed, rtol=1e-5)
    # 2. the whitening filter: nilearn's interior, Prais–Winsten first scan
    ours = whiten(y - x @ beta_nl, rho[None, :], 0)
    assert_close(ours[1:], white_nl[1:], rtol=1e-5)
    np.testing.assert_allclose(ours[0], np.sqrt(1 - rho**2) * white_nl[0], rtol=1e-5)
    # 3. bigglm's raw residuals vs nilearn's intended Y - X b
    result = bigglm.fit(nifti_run["store"], nifti_run["design"], noise="ar1")
    raw = result.residuals().values.astype(np.float64)
    intended = y - x @ beta_nl
    assert_close(raw, y - x @ result.beta.values)
    difference = raw - intended
    assert np.abs(difference).max() > 1e-6  # not the same model
    assert np.sqrt((difference**2).mean()) < 0.05 * intended.std()  # observed 1.6 %
    assert np.corrcoef(raw.ravel(), intended.ravel())[0, 1] > 0.999  # observed 0.99988


# --- outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("whitened", [False, True])
def test_nifti_and_zarr_outputs_round_trip(
    nifti_run: dict[str, Any], tmp_path: Path, whitened: bool
) -> None:
    result = bigglm.fit(nifti_run["store"], nifti_run["design"], noise="ar1")
    expected = result.residuals(whitened=whitened).values
    (nifti,) = result.write_residuals(tmp_path, "sub-01_task-x", whitened=whitened)
    (store,) = result.write_residuals(tmp_path, "sub-01_task-x", whitened=whitened, format="zarr")
    desc = "whitenedResiduals" if whitened else "residuals"
    assert nifti.name == f"sub-01_task-x_desc-{desc}_bold.nii.gz"
    assert store.name == f"sub-01_task-x_desc-{desc}_bold.zarr"
    source = nib.load(nifti_run["bold"])
    img = nib.load(nifti)
    mask = nifti_run["mask"]
    data = np.asarray(img.dataobj)
    assert img.shape == source.shape and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.affine, source.affine)
    assert img.header.get_zooms()[3] == TR
    np.testing.assert_array_equal(data[mask].T, expected)
    assert np.isnan(data[~mask]).all()
    # the store: the layout of a converted run, the chunks of the input
    run = bigglm.open_run(store)
    original = bigglm.open_run(nifti_run["store"])
    np.testing.assert_array_equal(run["bold"].values, expected)
    np.testing.assert_array_equal(run["mask"].values, mask)
    np.testing.assert_array_equal(run.attrs["affine"], original.attrs["affine"])
    assert run["bold"].data.chunksize == original["bold"].data.chunksize == (24, 13)
    assert run.attrs["residuals"]["whitened"] is whitened
    back = bigglm.to_nifti(run["bold"], run, tmp_path / "back.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(back).dataobj), data)
    with pytest.raises(StoreError, match="overwrite=True"):
        result.write_residuals(tmp_path, "sub-01_task-x", whitened=whitened)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


@pytest.mark.cluster
def test_written_on_a_distributed_client_as_in_process(
    nifti_run: dict[str, Any], tmp_path: Path, local_client: Any
) -> None:
    """Betas scattered to the workers, chunks written by them: the same numbers."""
    result = bigglm.fit(nifti_run["store"], nifti_run["design"], noise="ar2")
    expected = result.residuals(whitened=True).values
    paths = [
        result.write_residuals(tmp_path, "d", whitened=True, format=f, client=local_client)[0]
        for f in ("zarr", "nifti")
    ]
    np.testing.assert_array_equal(bigglm.open_run(paths[0])["bold"].values, expected)
    data = np.asarray(nib.load(paths[1]).dataobj)
    np.testing.assert_array_equal(data[nifti_run["mask"]].T, expected)


def test_result_loaded_from_zarr_reopens_its_store(
    nifti_run: dict[str, Any], tmp_path: Path
) -> None:
    result = bigglm.fit(nifti_run["store"], nifti_run["design"], noise="ar1")
    saved = GLMResult.from_zarr(result.to_zarr(tmp_path / "fit.zarr"))
    np.testing.assert_array_equal(
        saved.residuals(whitened=True).values, result.residuals(whitened=True).values
    )


def test_store_converted_again_after_the_fit_is_refused(
    nifti_run: dict[str, Any], tmp_path: Path
) -> None:
    store = bigglm.convert(nifti_run["bold"], tmp_path / "run.zarr", mask=nifti_run["mask"])
    saved = bigglm.fit(store, nifti_run["design"]).to_zarr(tmp_path / "fit.zarr")
    img = nib.load(nifti_run["bold"])
    changed = tmp_path / "changed.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine, img.header), changed)
    bigglm.convert(changed, store, mask=nifti_run["mask"], overwrite=True)
    with pytest.raises(StoreError, match="converted from other files since the fit"):
        GLMResult.from_zarr(saved).residuals()


def test_several_runs_need_a_run_index_and_a_prefix_each(tmp_path: Path) -> None:
    design, y = simulate(n_scans=50, n_vox=8, seed=1)
    design2, y2 = simulate(n_scans=60, n_vox=8, seed=2)
    result = bigglm.fit([as_run(y), as_run(y2)], [design, design2])
    with pytest.raises(DesignError, match=r"has 2 runs; pass run=0\.\.1"):
        result.residuals()
    with pytest.raises(DesignError, match="out of range"):
        result.residuals(2)
    assert result.residuals(1).shape == (60, 8)
    assert_close(
        result.residuals(1).values, brute_force_residuals(design2.to_numpy(), y2, 0)["raw"]
    )
    with pytest.raises(DesignError, match="got 1 prefixes for 2 runs"):
        result.write_residuals(tmp_path, "sub-01")
    with pytest.raises(StoreError, match="no voxel grid"):
        result.write_residuals(tmp_path, ["a", "b"])


# --- the workflow -------------------------------------------------------------------


def test_config_residuals_option() -> None:
    base = {"inputs": {"runs": [{"bold": "/b.nii"}]}, "outputs": {"folder": "/o"}}
    assert parse_config(base).outputs.residuals is None
    on = parse_config({**base, "outputs": {"folder": "/o", "residuals": True}}).outputs.residuals
    assert on is not None and (on.whitened, on.format) == (False, "nifti")
    cfg = {"folder": "/o", "residuals": {"whitened": True, "format": "zarr"}}
    options = parse_config({**base, "outputs": cfg}).outputs.residuals
    assert options is not None and (options.whitened, options.format) == (True, "zarr")
    with pytest.raises(ConfigError, match="did you mean 'whitened'"):
        parse_config({**base, "outputs": {"folder": "/o", "residuals": {"whitend": True}}})
    with pytest.raises(ConfigError, match=r"outputs\.residuals\.format"):
        parse_config({**base, "outputs": {"folder": "/o", "residuals": {"format": "mgz"}}})


@pytest.mark.cluster
def test_pipeline_writes_residuals_when_asked(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    from bigglm.pipeline import run_analysis

    inputs = {
        "bids": {
            "derivatives": str(tiny_bids / "derivatives"),
            "raw": str(tiny_bids / "raw"),
            "subjects": ["01"],
        }
    }
    cfg = tiny_config(
        tiny_bids, tmp_path / "out", inputs=inputs, model={"noise": "ols"}, contrasts={"a": "a"}
    )
    cfg["outputs"] = {"folder": str(tmp_path / "out"), "maps": ["z"], "residuals": True}
    (outcome,) = run_analysis(parse_config(cfg), client=local_client)
    folder = tmp_path / "out" / "sub-01"
    path = folder / "sub-01_task-tiny_desc-residuals_bold.nii.gz"
    assert outcome.residuals == [path] and outcome.steps["residuals"]["status"] == "ran"
    assert f"<td>{path.name}</td>" in outcome.report.read_text()
    func = tiny_bids / "derivatives" / "sub-01" / "func"
    bold = nib.load(func / "sub-01_task-tiny_desc-preproc_bold.nii.gz")
    mask = np.asarray(nib.load(func / "sub-01_task-tiny_desc-brain_mask.nii.gz").dataobj) > 0
    x = pd.read_csv(folder / "sub-01_task-tiny_design.tsv", sep="\t").to_numpy()
    y = np.asarray(bold.dataobj, dtype=np.float64)[mask].T
    expected = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    img = nib.load(path)
    np.testing.assert_array_equal(img.affine, bold.affine)
    # the design TSV holds 10 significant digits: compare at 1e-5 of the residuals' scale
    assert_close(np.asarray(img.dataobj)[mask].T, expected, rtol=1e-5)
    (again,) = run_analysis(parse_config(cfg), client=local_client)
    assert again.steps["residuals"]["status"] == "reused"
