"""The first-level workflow end to end: correctness, resumption, locks, lost workers.

References: designs from nilearn's ``make_first_level_design_matrix`` and a brute-force
per-voxel least-squares fit in numpy (float64), computed here from the NIfTI files.
Tolerances: the store holds the series as float32 exactly as the NIfTI does, and both
sides then work in float64, so OLS effects and t values agree to ~1e-9 relative; designs
agree with nilearn to 1e-6 of each column's largest magnitude (the design module's
documented contract).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from bigglm.config import AnalysisConfig, parse_config
from bigglm.exceptions import ConfigError, StoreError
from bigglm.pipeline import STATE, lock_units, map_path, plan, run_analysis

pytestmark = pytest.mark.cluster


def _brute_force_ols(bold: Path, design: pd.DataFrame, mask: np.ndarray, c: np.ndarray) -> Any:
    data = np.asarray(nib.load(bold).dataobj, dtype=np.float64)[mask].T  # (T, V)
    x = design.to_numpy()
    beta, *_ = np.linalg.lstsq(x, data, rcond=None)
    resid = data - x @ beta
    dof = x.shape[0] - np.linalg.matrix_rank(x)
    sigma2 = (resid**2).sum(axis=0) / dof
    effect = c @ beta
    t = effect / np.sqrt(sigma2 * (c @ np.linalg.pinv(x.T @ x) @ c))
    return effect, t


def test_ols_maps_match_nilearn_design_and_brute_force(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    from nilearn.glm.first_level import make_first_level_design_matrix

    cfg = tiny_config(tiny_bids, tmp_path / "out", model={"noise": "ols"})
    config = parse_config(cfg)
    outcomes = run_analysis(config, client=local_client)
    assert [o.name for o in outcomes] == ["sub-01_task-tiny", "sub-02_task-tiny"]

    func = tiny_bids / "derivatives" / "sub-01" / "func"
    events = pd.read_csv(tiny_bids / "raw/sub-01/func/sub-01_task-tiny_events.tsv", sep="\t")
    confounds = pd.read_csv(func / "sub-01_task-tiny_desc-confounds_timeseries.tsv", sep="\t")
    confounds = confounds.fillna(confounds.mean())  # bigglm's documented fill for leading n/a
    reference = make_first_level_design_matrix(
        np.arange(60) * 2.0, events, hrf_model="glover", drift_model="cosine", add_regs=confounds
    )
    written = pd.read_csv(tmp_path / "out/sub-01/sub-01_task-tiny_design.tsv", sep="\t")
    assert list(written.columns) == list(reference.columns)
    scale = np.abs(reference.to_numpy()).max(axis=0)
    assert np.all(np.abs(written.to_numpy() - reference.to_numpy()) <= 1e-6 * scale)

    mask = np.asarray(nib.load(func / "sub-01_task-tiny_desc-brain_mask.nii.gz").dataobj) > 0
    c = np.array([1.0 if n == "a" else -1.0 if n == "b" else 0.0 for n in reference.columns])
    effect, t = _brute_force_ols(
        func / "sub-01_task-tiny_desc-preproc_bold.nii.gz", reference, mask, c
    )
    maps = {
        stat: np.asarray(nib.load(map_path(config, "sub-01_task-tiny", "a_minus_b", stat)).dataobj)
        for stat in ("effect", "stat")
    }
    np.testing.assert_allclose(maps["effect"][mask], effect, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(maps["stat"][mask], t, rtol=1e-6, atol=1e-9)
    assert np.isnan(maps["stat"][~mask]).all()


def test_rerun_reuses_every_step_and_changes_nothing(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "out")
    first = run_analysis(config, client=local_client)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.nii.gz")}
    second = run_analysis(config, client=local_client)
    assert all(s["status"] == "ran" for s in first[0].steps.values())
    assert {s["status"] for s in second[0].steps.values()} == {"reused"}
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.nii.gz")}
    assert before == after and before


def test_the_pipeline_and_the_api_name_the_maps_of_a_contrast_alike(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """stat-t for a t contrast, stat-F for an F one, from both; entities from the sources."""
    from bigglm import GLMResult

    maps = ["effect", "variance", "stat", "p", "z"]
    cfg = tiny_config(tiny_bids, tmp_path / "out", inputs=_one_subject(tiny_bids))
    config = parse_config({**cfg, "outputs": {**cfg["outputs"], "maps": maps}})
    (outcome,) = run_analysis(config, client=local_client)
    result = GLMResult.from_zarr(tmp_path / "out/sub-01/sub-01_task-tiny_glm.zarr")
    for name, label, kind in (("a_minus_b", "aMinusB", "t"), ("any", "any", "F")):
        api = result.to_nifti(tmp_path / "api", {name: config.contrasts[name]}, kind=kind)
        ours = [p for p in outcome.maps if f"_contrast-{label}_" in p.name]
        assert sorted(p.name for p in api) == sorted(p.name for p in ours)
        stem = f"sub-01_task-tiny_contrast-{label}_stat-"
        assert {p.name for p in ours} == {
            f"{stem}{s}_statmap.nii.gz" for s in (*maps[:2], kind, "p", "z")
        }
        for path in ours:
            np.testing.assert_array_equal(
                nib.load(path).get_fdata(), nib.load(tmp_path / "api" / path.name).get_fdata()
            )
    assert not list((tmp_path / "out").rglob("*stat-stat*"))


def test_changed_source_is_converted_again(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "out")
    run_analysis(config, client=local_client)
    bold = tiny_bids / "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.nii.gz"
    img = nib.load(bold)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1.0, img.affine, img.header), bold)
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.steps["convert-sub-01_task-tiny"]["status"] == "ran"
    assert outcome.steps["fit"]["status"] == "ran"
    assert outcome.steps["designs"]["status"] == "reused"  # the design did not change


def test_changed_model_refits_but_keeps_the_stores(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    cfg = tiny_config(tiny_bids, tmp_path / "out", inputs=_one_subject(tiny_bids))
    run_analysis(parse_config(cfg), client=local_client)
    (outcome,) = run_analysis(parse_config({**cfg, "model": {"noise": "ols"}}), client=local_client)
    assert outcome.steps["convert-sub-01_task-tiny"]["status"] == "reused"
    assert outcome.steps["fit"]["status"] == "ran"


def test_provenance_records_config_versions_checksums_and_timings(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    import hashlib

    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "out", report=True)
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.provenance is not None
    record = json.loads(outcome.provenance.read_text())
    assert record["config"]["model"]["noise"] == "ar1"
    assert record["environment"]["packages"]["numpy"] == np.__version__
    bold = tiny_bids / "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.nii.gz"
    (entry,) = [i for i in record["inputs"] if i["path"] == str(bold.resolve())]
    assert entry["sha256"] == hashlib.sha256(bold.read_bytes()).hexdigest()
    assert record["steps"]["fit"]["status"] == "ran" and record["steps"]["fit"]["seconds"] >= 0
    assert outcome.report is not None  # the HTML report (browser-checked: test_report_browser)
    page = outcome.report.read_text()
    assert all(f"<h2>Contrast {name}</h2>" in page for name in ("a", "a_minus_b", "any"))
    # the mask; design, contrast matrix and correlations of the run; slices and glass x 3
    assert page.count("data:image/png;base64,") == 1 + 3 + 2 * 3
    assert "<h2>Model</h2>" in page and "VIF" in page and "Clusters at z" in page


def _one_subject_config(
    tiny_config: Any, dataset: Path, outputs: Path, **sections: Any
) -> AnalysisConfig:
    """The parsed tiny_config analysis of subject 01 alone, writing to ``outputs``."""
    return parse_config(tiny_config(dataset, outputs, inputs=_one_subject(dataset), **sections))


def _convert_beforehand(dataset: Path, stores: Path, *, with_mask: bool) -> None:
    """Convert subject 01's series into ``stores`` as the workflow would name it."""
    import bigglm

    func = dataset / "derivatives/sub-01/func"
    stores.mkdir(parents=True)
    bigglm.convert(
        func / "sub-01_task-tiny_desc-preproc_bold.nii.gz",
        stores / "sub-01_task-tiny_bold.zarr",
        mask=func / "sub-01_task-tiny_desc-brain_mask.nii.gz" if with_mask else None,
    )


def _one_subject(dataset: Path) -> dict[str, Any]:
    return {
        "bids": {
            "derivatives": str(dataset / "derivatives"),
            "raw": str(dataset / "raw"),
            "subjects": ["01"],
        },
        "confounds": ["trans_x"],
    }


# --- plan: bad inputs are reported before any long work ------------------------------------


def test_contrast_on_unknown_column_is_reported_with_a_suggestion(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_bids, tmp_path / "out", contrasts={"x": "aa - b"})
    with pytest.raises(ConfigError, match=r"contrasts.x: .*did you mean 'a' for 'aa'\?"):
        plan(parse_config(cfg))
    assert not (tmp_path / "out").exists()


def test_missing_events_file_is_named(tiny_config: Any, tiny_bids: Path, tmp_path: Path) -> None:
    bold = tiny_bids / "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.nii.gz"
    cfg = tiny_config(
        tiny_bids,
        tmp_path / "out",
        inputs={"runs": [{"bold": str(bold), "events": str(tmp_path / "missing.tsv")}]},
        contrasts={},
    )
    with pytest.raises(ConfigError, match=r"inputs: .*missing.tsv does not exist"):
        plan(parse_config(cfg))


def test_runs_on_different_grids_cannot_be_fitted_together(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path
) -> None:
    bold = tiny_bids / "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.nii.gz"
    small = tmp_path / "small_bold.nii.gz"
    img = nib.load(bold)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:8], img.affine, img.header), small)
    runs = [{"bold": str(bold)}, {"bold": str(small), "subject": "01", "task": "tiny"}]
    cfg = tiny_config(tiny_bids, tmp_path / "out", inputs={"runs": runs}, contrasts={})
    with pytest.raises(ConfigError, match="not on the grid of"):
        plan(parse_config(cfg))


def test_subject_filter_keeps_one_unit(tiny_config: Any, tiny_bids: Path, tmp_path: Path) -> None:
    units = plan(parse_config(tiny_config(tiny_bids, tmp_path / "out")), subjects=["sub-02"])
    assert [u.name for u in units] == ["sub-02_task-tiny"]


# --- locks ---------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path | None = None, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bigglm.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_second_run_on_the_same_outputs_refuses(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = _write_yaml(tmp_path / "a.yaml", tiny_config(tiny_bids, out))
    with lock_units(out, ["sub-01_task-tiny"]):  # what a running `bigglm run` holds
        done = _cli("run", str(cfg))
        _, stderr = done.communicate(timeout=120)
    assert done.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr
    assert "sub-01_task-tiny is being written by another bigglm run" in lines[0]
    assert not list(out.rglob("*_statmap.nii.gz"))  # nothing was written by the refused run


def test_lock_of_a_dead_process_is_taken_over(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    import socket

    out = tmp_path / "out"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    locks = out / STATE / "locks"
    locks.mkdir(parents=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "created": 0.0, "since": "then"}
    (locks / "sub-01_task-tiny.lock").write_text(json.dumps(stale))
    config = _one_subject_config(tiny_config, tiny_bids, out)
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.maps and all(p.exists() for p in outcome.maps)
    assert not (locks / "sub-01_task-tiny.lock").exists()  # released at the end


def test_lock_held_elsewhere_refuses_in_process(tmp_path: Path) -> None:
    with lock_units(tmp_path, ["u"]), pytest.raises(StoreError, match="wait for it to finish"):
        with lock_units(tmp_path, ["u"]):
            pass
    with lock_units(tmp_path, ["u"]):  # released: can be taken again
        pass


# --- killed runs and lost workers ----------------------------------------------------------


def _run_until(config: Path, marker: Any, timeout: float = 120.0) -> bool:
    """Start ``bigglm run`` and SIGKILL it as soon as ``marker()`` is true; True if killed."""
    proc = _cli("-q", "run", str(config), start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if marker():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        try:  # the driver's own worker processes (same session), started by this test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


_ONE_WORKER = {"profile": "local", "n_workers": 1}


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_bids: Any, tiny_config: Any
) -> tuple[Path, Path]:
    """A dataset and the outputs of one uninterrupted ``bigglm run`` on it."""
    root = tmp_path_factory.mktemp("uninterrupted")
    dataset = make_tiny_bids(root / "dataset")
    reference = root / "reference"
    config = _write_yaml(root / "ref.yaml", tiny_config(dataset, reference, cluster=_ONE_WORKER))
    assert _cli("run", str(config)).wait(timeout=300) == 0
    return dataset, reference


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["lock", "convert-sub-01_task-tiny", "fit", "contrast-a"])
def test_run_killed_at_any_point_resumes_with_identical_outputs(
    assert_same_maps: Any,
    tiny_config: Any,
    uninterrupted: tuple[Path, Path],
    tmp_path: Path,
    kill_after: str,
) -> None:
    tiny_bids, reference = uninterrupted
    cluster = _ONE_WORKER
    out = tmp_path / "out"
    cfg = _write_yaml(tmp_path / "a.yaml", tiny_config(tiny_bids, out, cluster=cluster))
    steps = out / STATE / "steps" / "sub-01_task-tiny"
    marker = {
        "lock": lambda: (out / STATE / "locks" / "sub-01_task-tiny.lock").exists(),
    }.get(kill_after, lambda: (steps / f"{kill_after}.json").exists())
    assert _run_until(cfg, marker), "the run finished before it could be killed"
    finished_before = {p.stem for p in steps.glob("*.json")} if steps.exists() else set()

    rerun = _cli("run", str(cfg))
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert_same_maps(reference, out)
    record = json.loads((out / "sub-01" / "sub-01_task-tiny_provenance.json").read_text())
    for step in finished_before:
        assert record["steps"][step]["status"] == "reused", step
    leftovers = [p for p in out.rglob(".*") if p.name != STATE and STATE not in p.parts]
    assert not leftovers, leftovers  # no temporary files or partial stores left behind


def test_worker_killed_mid_fit_does_not_change_results(
    assert_same_maps: Any, tiny_config: Any, tiny_bids: Path, tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import WorkerPlugin

    class KillOnce(WorkerPlugin):
        """SIGKILL the worker process after its first finished task (once per cluster)."""

        def __init__(self, flag: str) -> None:
            self.flag = flag

        def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
            if finish == "memory" and not os.path.exists(self.flag):
                try:
                    os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = tiny_config(tiny_bids, tmp_path / "ref", inputs=_one_subject(tiny_bids))
    flag = tmp_path / "killed"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        run_analysis(parse_config(cfg), client=client)
        client.register_plugin(KillOnce(str(flag)))
        lossy = {**cfg, "outputs": {**cfg["outputs"], "folder": str(tmp_path / "lossy")}}
        run_analysis(parse_config(lossy), client=client)
    assert flag.exists(), "no worker was killed"
    assert_same_maps(tmp_path / "ref", tmp_path / "lossy")


# --- the workflows/ recipes ----------------------------------------------------------------


@pytest.mark.slow
def test_python_recipe_gives_the_maps_of_bigglm_run(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """workflows/first_level.py (API step by step) and the pipeline agree to 1e-12."""
    recipe = Path(__file__).resolve().parents[1] / "workflows" / "first_level.py"
    derivatives, raw = tiny_bids / "derivatives", tiny_bids / "raw"
    arguments = [str(derivatives), "01", "tiny", str(tmp_path / "recipe"), "--raw", str(raw)]
    done = subprocess.run(
        [sys.executable, str(recipe), *arguments, "--contrast", "aMinusB=a - b"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "run")
    config = config.model_copy(
        update={"inputs": config.inputs.model_copy(update={"confounds": ["trans_*", "rot_*"]})}
    )
    run_analysis(config, client=local_client)
    for stat in ("effect", "z"):
        ours = nib.load(map_path(config, "sub-01_task-tiny", "a_minus_b", stat)).get_fdata()
        theirs = nib.load(
            tmp_path / "recipe" / f"sub-01_task-tiny_contrast-aMinusB_stat-{stat}_statmap.nii.gz"
        ).get_fdata()
        scale = float(np.nanmax(np.abs(ours)))
        np.testing.assert_allclose(theirs, ours, rtol=1e-12, atol=1e-12 * scale, equal_nan=True)


def _other_scans(bold: Path) -> None:
    """Make a copied run's scans differ from the original's: the same scans given as two
    runs are refused (they would double the degrees of freedom)."""
    img = nib.load(bold)
    data = np.asarray(img.dataobj) + np.random.default_rng(1).normal(0, 1, img.shape)
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine, img.header), bold)


def test_two_runs_with_different_masks_are_fitted_on_their_intersection(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    import shutil

    func = tiny_bids / "derivatives/sub-01/func"
    raw = tiny_bids / "raw/sub-01/func"
    originals = list(func.glob("sub-01_task-tiny_*")) + list(raw.glob("sub-01_task-tiny_*"))
    for run in ("1", "2"):
        for path in originals:
            name = path.name.replace("task-tiny_", f"task-tiny_run-{run}_")
            shutil.copy(path, path.with_name(name))
    _other_scans(func / "sub-01_task-tiny_run-2_desc-preproc_bold.nii.gz")
    smaller = func / "sub-01_task-tiny_run-2_desc-brain_mask.nii.gz"
    img = nib.load(smaller)
    data = np.asarray(img.dataobj).copy()
    data[:, :, 1] = 0  # run 2's mask lacks one slice
    nib.save(nib.Nifti1Image(data, img.affine), smaller)
    inputs = _one_subject(tiny_bids)
    inputs["bids"]["runs"] = ["1", "2"]
    config = parse_config(tiny_config(tiny_bids, tmp_path / "out", inputs=inputs))
    (outcome,) = run_analysis(config, client=local_client)
    assert (outcome.n_runs, outcome.n_volumes) == (2, 120)
    assert outcome.n_voxels == 8 * 8 * 7  # the interior minus the slice run 2 lacks
    z = nib.load(map_path(config, "sub-01_task-tiny", "a", "z")).get_fdata()
    assert np.isnan(z[:, :, 1]).all() and np.isfinite(z[1:-1, 1:-1, 2:-1]).all()


def test_temporary_files_of_a_killed_run_are_removed(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """Staging a killed writer recorded as its own is removed; unrecorded files are kept
    (bigglm cannot prove it wrote them: a user's hidden file looks the same)."""
    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "out")
    folder = tmp_path / "out" / "sub-01"
    folder.mkdir(parents=True)
    killed = (
        "import os, sys; from pathlib import Path; from bigglm.io.artefacts import writing\n"
        "with writing(Path(sys.argv[1]), 'glm-result', overwrite=True, directory=True) as s:\n"
        "    (s / 'zarr.json').write_text('{}'); print(s, flush=True); os._exit(9)\n"
    )
    target = folder / "sub-01_task-tiny_glm.zarr"
    done = subprocess.run(
        [sys.executable, "-c", killed, str(target)], capture_output=True, text=True, check=False
    )
    half_store = Path(done.stdout.strip())
    assert done.returncode == 9 and half_store.is_dir()  # left by a writer that died
    unrecorded = folder / ".sub-01_task-tiny_glm.zarr.partial-0123"  # not provably bigglm's
    unrecorded.mkdir()
    run_analysis(config, client=local_client)
    assert not half_store.exists()
    assert unrecorded.exists()
    assert not list(folder.glob(".*.owner-*.json"))


def test_a_store_converted_beforehand_from_the_same_file_is_reused(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    _convert_beforehand(tiny_bids, tmp_path / "out" / "stores", with_mask=True)
    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "out")
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.steps["convert-sub-01_task-tiny"]["status"] == "reused"
    assert outcome.steps["fit"]["status"] == "ran"


def test_a_store_with_a_missing_chunk_is_converted_again(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """The source's checksum still matches, but the store is damaged: not reused."""
    from bigglm.io import verify_store

    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "out")
    run_analysis(config, client=local_client)
    store = tmp_path / "out" / "stores" / "sub-01_task-tiny_bold.zarr"
    chunk = next(p for p in sorted((store / "bold" / "c").rglob("*")) if p.is_file())
    chunk.unlink()
    with pytest.raises(StoreError, match="is missing"):
        verify_store(store)
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.steps["convert-sub-01_task-tiny"]["status"] == "ran", outcome.steps
    assert outcome.steps["fit"]["status"] == "reused"  # made from the same source file
    verify_store(store, full=True)


def test_a_store_with_a_flipped_byte_is_set_aside_and_converted_on_the_next_run(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """A flipped byte passes every cheap check (the source digest, the chunk files), so
    the fit that reads it fails; the store is then moved aside, never reused, and the
    next run converts the run anew and gives the maps of the undamaged data."""
    out = tmp_path / "out"
    config = _one_subject_config(tiny_config, tiny_bids, out)
    run_analysis(config, client=local_client)
    z_map = map_path(config, "sub-01_task-tiny", "a", "z")
    fresh = np.asarray(nib.load(z_map).dataobj)
    store = out / "stores" / "sub-01_task-tiny_bold.zarr"
    chunk = next(p for p in sorted((store / "bold" / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    refit = _one_subject_config(tiny_config, tiny_bids, out, model={"noise": "ols"})
    with pytest.raises(StoreError, match=r"is damaged \(checksum mismatch\); the store was moved"):
        run_analysis(refit, client=local_client)
    assert not store.exists() and len(list(store.parent.glob(f".{store.name}.damaged-*"))) == 1
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.steps["convert-sub-01_task-tiny"]["status"] == "ran", outcome.steps
    np.testing.assert_array_equal(np.asarray(nib.load(z_map).dataobj), fresh)


def test_a_store_replaced_while_the_fit_reads_it_is_not_set_aside(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """Another process replaces the store (other voxels) after the fit opened it: the
    old store's chunks fail to decode from the new one's files. The new store is not
    damaged and is not moved aside (it was, and its analysis then failed on it)."""
    import bigglm
    from bigglm.exceptions import StoreDamaged
    from bigglm.pipeline.steps import damaged_stores_set_aside

    out = tmp_path / "out"
    config = _one_subject_config(tiny_config, tiny_bids, out)
    run_analysis(config, client=local_client)
    (unit,) = plan(config)
    store = unit.runs[0].store
    func = tiny_bids / "derivatives/sub-01/func"
    mask = np.asarray(nib.load(func / "sub-01_task-tiny_desc-brain_mask.nii.gz").dataobj) > 0
    mask[:, :, 2] = False
    with pytest.raises(StoreError, match="was replaced by another process") as caught:
        with damaged_stores_set_aside(unit):
            bold = bigglm.open_run(store)["bold"]
            bigglm.convert(unit.runs[0].run.bold, store, mask=mask, overwrite=True)
            bold.values  # noqa: B018 - the read that fails
    assert not isinstance(caught.value, StoreDamaged)
    assert store.exists() and not list(store.parent.glob(f".{store.name}.damaged-*"))
    assert int(np.asarray(bigglm.open_run(store)["mask"]).sum()) == int(mask.sum())


def test_a_store_with_other_voxels_is_converted_again(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    _convert_beforehand(tiny_bids, tmp_path / "out" / "stores", with_mask=False)
    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "out")
    (outcome,) = run_analysis(config, client=local_client)  # the EPI mask is not the brain mask
    assert outcome.steps["convert-sub-01_task-tiny"]["status"] == "ran"
    assert outcome.n_voxels == 8 * 8 * 8


def _task_counts(events: list[dict[str, Any]]) -> dict[str, int]:
    """Tasks of a distributed task stream, counted by function name."""
    from dask.utils import key_split

    counts: dict[str, int] = {}
    for event in events:
        prefix = key_split(event["key"])
        counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def test_runs_are_hashed_and_converted_on_the_workers_in_parallel(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """Every unit's runs are converted up front, one task per run on the workers (with
    the source files hashed there too); the unit steps then reuse the stores and record
    the conversions as run, and a rerun converts nothing."""
    from distributed import get_task_stream

    config = parse_config(tiny_config(tiny_bids, tmp_path / "out", model={"noise": "ols"}))
    with get_task_stream(local_client) as stream:
        outcomes = run_analysis(config, client=local_client)
    counts = _task_counts(stream.data)
    assert counts.get("timed_convert") == 2 and counts.get("sha256_file") == 2
    for outcome in outcomes:
        assert outcome.steps[f"convert-{outcome.name}"]["status"] == "ran"
        assert outcome.steps[f"convert-{outcome.name}"]["seconds"] > 0
    with get_task_stream(local_client) as stream:
        again = run_analysis(config, client=local_client)
    assert "timed_convert" not in _task_counts(stream.data)
    assert all(o.steps[f"convert-{o.name}"]["status"] == "reused" for o in again)


def _explicit_runs(dataset: Path, bolds: list[str]) -> dict[str, Any]:
    """``inputs`` naming runs of sub-01 (no masks) with sub-01's events."""
    events = str(dataset / "raw/sub-01/func/sub-01_task-tiny_events.tsv")
    return {"runs": [{"bold": b, "events": events, "subject": "01", "task": "tiny"} for b in bolds]}


def test_later_runs_without_masks_take_the_first_runs_epi_mask_on_the_workers(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """Runs given without masks: a unit's first run is converted first (its EPI mask is
    computed from the data), then its other runs on the same voxels, in parallel."""
    from distributed import get_task_stream

    func = tiny_bids / "derivatives/sub-01/func"
    bold = func / "sub-01_task-tiny_desc-preproc_bold.nii.gz"
    img = nib.load(bold)
    runs = []
    for index, shift in enumerate((0.0, 2.0, -1.0)):
        path = tmp_path / f"run{index + 1}_bold.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + shift, img.affine, img.header), path)
        runs.append(str(path))
    cfg = tiny_config(tiny_bids, tmp_path / "out", model={"noise": "ols"})
    cfg["inputs"] = _explicit_runs(tiny_bids, runs)
    config = parse_config(cfg)
    with get_task_stream(local_client) as stream:
        (outcome,) = run_analysis(config, client=local_client)
    # the first run, then runs 2 and 3 (submitted together) with its EPI mask
    assert _task_counts(stream.data).get("timed_convert") == 3
    import bigglm

    (unit,) = plan(config)
    masks = [np.asarray(bigglm.open_run(rp.store)["mask"].values) for rp in unit.runs]
    assert len(masks) == 3 and all(np.array_equal(m, masks[0]) for m in masks)
    assert {s["status"] for k, s in outcome.steps.items() if k.startswith("convert")} == {"ran"}


def test_relative_input_paths_reach_the_workers_resolved(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any, monkeypatch: Any
) -> None:
    """A configuration built in Python (no YAML folder) may name inputs relative to the
    current directory; the workers, started elsewhere, still hash and convert them."""
    func = tiny_bids / "derivatives/sub-01/func"
    here = tmp_path / "here"
    here.mkdir()
    for index in (1, 2):
        (here / f"run{index}_bold.nii.gz").write_bytes(
            (func / "sub-01_task-tiny_desc-preproc_bold.nii.gz").read_bytes()
        )
    _other_scans(here / "run2_bold.nii.gz")
    monkeypatch.chdir(here)
    cfg = tiny_config(tiny_bids, tmp_path / "out", model={"noise": "ols"})
    cfg["inputs"] = _explicit_runs(tiny_bids, [f"run{i}_bold.nii.gz" for i in (1, 2)])
    (outcome,) = run_analysis(parse_config(cfg), client=local_client)
    converted = {k: v["status"] for k, v in outcome.steps.items() if k.startswith("convert")}
    assert len(converted) == 2 and set(converted.values()) == {"ran"}, converted


def test_a_file_bigglm_did_not_write_at_an_output_path_is_refused(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """A rerun replaces the analysis's own outputs; a user's file at such a path, never."""
    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "out")
    run_analysis(config, client=local_client)
    z_map = map_path(config, "sub-01_task-tiny", "a", "z")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), z_map)  # a user's
    mine = z_map.read_bytes()
    (tmp_path / "out" / STATE / "steps" / "sub-01_task-tiny" / "contrast-a.json").unlink()
    with pytest.raises(StoreError, match="is a file not written by bigglm; refusing"):
        run_analysis(config, client=local_client)
    assert z_map.read_bytes() == mine


def test_outputs_of_another_analysis_are_replaced_only_with_overwrite(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """Two configs, one outputs folder: the second is refused (its maps would replace the
    first's under the same names) until it is told to take the folder over."""
    from bigglm.config import load_config

    out = tmp_path / "out"
    first = _write_yaml(
        tmp_path / "a.yaml", tiny_config(tiny_bids, out, inputs=_one_subject(tiny_bids))
    )
    other = tiny_config(tiny_bids, out, inputs=_one_subject(tiny_bids), contrasts={"a": "b"})
    second = _write_yaml(tmp_path / "b.yaml", other)
    run_analysis(load_config(first), client=local_client)
    z_map = map_path(load_config(first), "sub-01_task-tiny", "a", "z")
    before = z_map.read_bytes()
    run_analysis(load_config(first), client=local_client)  # the same analysis resumes
    with pytest.raises(
        StoreError, match=r"holds the outputs of another analysis \(config .*a\.yaml"
    ):
        run_analysis(load_config(second), client=local_client)
    assert z_map.read_bytes() == before
    done = _cli("run", str(second))
    _, stderr = done.communicate(timeout=120)
    assert done.returncode == 2 and len(stderr.strip().splitlines()) == 1
    assert z_map.read_bytes() == before
    run_analysis(load_config(second), client=local_client, overwrite=True)
    assert z_map.read_bytes() != before  # contrast 'a' is now b's map, as asked
    with pytest.raises(StoreError, match="another analysis"):  # b owns the folder now
        run_analysis(load_config(first), client=local_client)


def test_unit_folders_with_bigglm_outputs_but_no_record_are_another_analysis(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """A folder whose bigglm maps came from elsewhere (copied, `bigglm fit`) has no owner
    record: its maps are not replaced unasked."""
    import shutil

    config = _one_subject_config(tiny_config, tiny_bids, tmp_path / "out")
    run_analysis(config, client=local_client)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "out" / "sub-01", copy / "sub-01")
    moved = _one_subject_config(tiny_config, tiny_bids, copy)
    z_map = map_path(moved, "sub-01_task-tiny", "a", "z")
    before = z_map.read_bytes()
    with pytest.raises(StoreError, match="holds outputs of another analysis"):
        run_analysis(moved, client=local_client)
    assert z_map.read_bytes() == before
    run_analysis(moved, client=local_client, overwrite=True)
    assert (copy / STATE / "analysis.json").is_file()


def test_a_worker_keeps_a_store_made_meanwhile_from_the_same_file_and_mask(
    tiny_bids: Path, tmp_path: Path
) -> None:
    """Two analyses sharing store.folder: the worker that converts second finds, under the
    store's lock, the store the first made (same file, same mask) and keeps it, so a store
    the first may be reading is not replaced (it was, whenever a mask was given)."""
    import hashlib

    from bigglm.io import convert
    from bigglm.pipeline import steps

    func = tiny_bids / "derivatives" / "sub-01" / "func"
    bold = func / "sub-01_task-tiny_desc-preproc_bold.nii.gz"
    mask = func / "sub-01_task-tiny_desc-brain_mask.nii.gz"
    store = convert(bold, tmp_path / "run.zarr", mask=mask, tr=2.0)
    made = (store / "zarr.json").stat()
    sha256 = hashlib.sha256(bold.read_bytes()).hexdigest()
    steps._timed_convert(bold, store, mask, 2.0, None, sha256)
    kept = (store / "zarr.json").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    steps._timed_convert(bold, store, None, 2.0, None, "0" * 64)  # another file: converted
    assert (store / "zarr.json").stat().st_ino != made.st_ino
