"""The first-level workflow on surfaces: fMRIPrep's GIFTI pairs and CIFTI-2 series, end to end.

A small BIDS derivatives folder is written here with nibabel: per run, a GIFTI series per
hemisphere (``*_hemi-L_space-fsaverage5_bold.func.gii``, 180 and 150 vertices, a constant
medial wall) with a JSON sidecar giving ``RepetitionTime``, and a CIFTI-2 dense series
(``*_space-fsLR_den-91k_bold.dtseries.nii``: the two cortices and an 18-voxel thalamus).

Reference: the Python API (``bigglm.design.make_run_design``, ``bigglm.fit`` on the stores
the workflow converted, ``GLMResult.contrast``). The workflow computes the same numbers
from the same float32 store, and writes them as float32 (GIFTI and CIFTI-2 hold float32):
maps agree with the API's values rounded to float32 to 1e-6 relative (the two fits may
differ by a few ulps of float64; float32 rounding itself is compared exactly, which also
covers p values below float32's smallest normal number), with NaN exactly on the
vertices the store left out (the medial wall).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.cifti2 import cifti2_axes

import bigglm
from bigglm.config import parse_config
from bigglm.design import make_run_design
from bigglm.exceptions import ConfigError
from bigglm.pipeline import run_analysis

pytestmark = pytest.mark.cluster

TR = 2.0
N_SCANS = 40
VERTICES = {"L": 180, "R": 150}
MEDIAL = {"L": slice(0, 20), "R": slice(130, 150)}  # constant 0, as fMRIPrep writes them
STRUCTURES = {"L": "CortexLeft", "R": "CortexRight"}
VOLUME = (4, 4, 3)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
CONTRASTS = {"a": "a", "a_minus_b": "a - b", "any": ["a", "b"]}
MAPS = ["effect", "variance", "stat", "p", "z"]
RUNS = [("01", "1"), ("01", "2"), ("02", "1")]


def _kept(hemi: str) -> np.ndarray:
    keep = np.ones(VERTICES[hemi], bool)
    keep[MEDIAL[hemi]] = False
    return keep


def _events(path: Path) -> Path:
    onsets = np.arange(0.0, N_SCANS * TR, 16.0)
    trial_type = ["a" if i % 2 == 0 else "b" for i in range(len(onsets))]
    frame = pd.DataFrame({"onset": onsets, "duration": 6.0, "trial_type": trial_type})
    frame.to_csv(path, sep="\t", index=False)
    return path


def _series(rng: np.random.Generator, n: int, events: Path) -> np.ndarray:
    """``(N_SCANS, n)`` float32: 600 plus task effects, drift and noise."""
    x = make_run_design(N_SCANS, TR, events=events, hrf="glover", drift="cosine").to_numpy()
    beta = rng.normal(size=(x.shape[1], n)) * 3.0
    return (600.0 + x @ beta + rng.normal(size=(N_SCANS, n))).astype(np.float32)


def _write_gifti(path: Path, data: np.ndarray, hemi: str) -> None:
    """A GIFTI functional series as fMRIPrep writes it: one data array per time point."""
    meta = nib.gifti.GiftiMetaData({"AnatomicalStructurePrimary": STRUCTURES[hemi]})
    image = nib.GiftiImage(meta=meta)
    for row in data:
        image.add_gifti_data_array(nib.gifti.GiftiDataArray(row, intent="NIFTI_INTENT_TIME_SERIES"))
    nib.save(image, path)


def _brain_models() -> Any:
    thalamus = np.zeros(VOLUME, bool)
    thalamus[1:4, 1:4, 1:3] = True
    return (
        cifti2_axes.BrainModelAxis.from_mask(_kept("L"), "CortexLeft")
        + cifti2_axes.BrainModelAxis.from_mask(_kept("R"), "CortexRight")
        + cifti2_axes.BrainModelAxis.from_mask(thalamus, "thalamus_left", affine=AFFINE)
    )


def _write_dataset(root: Path) -> Path:
    """fMRIPrep-shaped derivatives and raw folders; returns the dataset root."""
    rng = np.random.default_rng(17)
    models = _brain_models()
    for sub, run in RUNS:
        func, raw = root / f"derivatives/sub-{sub}/func", root / f"raw/sub-{sub}/func"
        func.mkdir(parents=True, exist_ok=True)
        raw.mkdir(parents=True, exist_ok=True)
        entities = f"sub-{sub}_task-x_run-{run}"
        events = _events(raw / f"{entities}_events.tsv")
        confounds = pd.DataFrame({"trans_x": rng.normal(size=N_SCANS)})
        confounds.to_csv(func / f"{entities}_desc-confounds_timeseries.tsv", sep="\t", index=False)
        for hemi, n in VERTICES.items():
            data = _series(rng, n, events)
            data[:, MEDIAL[hemi]] = 0.0
            name = f"{entities}_hemi-{hemi}_space-fsaverage5_bold"
            _write_gifti(func / f"{name}.func.gii", data, hemi)
            (func / f"{name}.json").write_text(json.dumps({"RepetitionTime": TR}))
        grayordinates = _series(rng, len(models), events)
        image = nib.Cifti2Image(
            grayordinates, header=(cifti2_axes.SeriesAxis(0.0, TR, N_SCANS), models)
        )
        image.nifti_header.set_intent("NIFTI_INTENT_CONNECTIVITY_DENSE_SERIES")
        nib.save(image, func / f"{entities}_space-fsLR_den-91k_bold.dtseries.nii")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("surface-bids"))


def _config(dataset: Path, out: Path, space: str, noise: str = "ols", **sections: Any) -> Any:
    return parse_config(
        {
            "inputs": {
                "bids": {
                    "derivatives": str(dataset / "derivatives"),
                    "raw": str(dataset / "raw"),
                    "space": space,
                },
                "confounds": ["trans_x"],
            },
            "model": {"noise": noise, "hrf": "glover", "drift": "cosine"},
            "contrasts": CONTRASTS,
            "outputs": {"folder": str(out), "maps": MAPS, "report": False},
            "store": {"folder": str(out / "stores"), "time_chunk": 16},
            **sections,
        }
    )


def _api_fit(config: Any, subject: str, noise: str) -> Any:
    """The Python API's fit of the stores the workflow converted for ``subject``."""
    stores, designs = [], []
    for sub, run in RUNS:
        if sub != subject:
            continue
        entities = f"sub-{sub}_task-x_run-{run}"
        func = config.inputs.bids.derivatives / f"sub-{sub}/func"
        (store,) = config.store_folder.glob(f"{entities}_space-{config.inputs.bids.space}*.zarr")
        stores.append(bigglm.open_run(store))
        designs.append(
            make_run_design(
                N_SCANS,
                TR,
                events=config.inputs.bids.raw / f"sub-{sub}/func/{entities}_events.tsv",
                confounds=func / f"{entities}_desc-confounds_timeseries.tsv",
                confound_columns=["trans_x"],
                hrf="glover",
                drift="cosine",
            )
        )
    return bigglm.fit(stores, designs, noise=noise)


def _gifti_maps(path_left: Path) -> np.ndarray:
    """The left and right GIFTI files of a map, ``(rows, L vertices + R vertices)``."""
    rows = []
    for hemi in VERTICES:
        image = nib.load(str(path_left).replace("hemi-L", f"hemi-{hemi}"))
        assert image.meta["AnatomicalStructurePrimary"] == STRUCTURES[hemi]
        rows.append(np.stack([d.data for d in image.darrays]))
        assert rows[-1].shape[1] == VERTICES[hemi] and rows[-1].dtype == np.float32
    return np.concatenate(rows, axis=1)


def _expected(values: np.ndarray) -> np.ndarray:
    """API values ``(rows, kept columns)`` on every vertex of both meshes, NaN on the wall."""
    keep = np.concatenate([_kept(h) for h in VERTICES])
    full = np.full((values.shape[0], keep.size), np.nan, dtype=np.float32)
    full[:, keep] = values
    return full


def _rows(values: Any) -> np.ndarray:
    """API values as the files hold them: float32, ``(rows, columns)``."""
    data = np.asarray(values, dtype=np.float32)
    return data[None, :] if data.ndim == 1 else data


@pytest.mark.parametrize("noise", ["ols", "ar1"])
def test_a_gifti_study_writes_the_apis_maps_per_hemisphere(
    dataset: Path, tmp_path: Path, local_client: Any, noise: str
) -> None:
    from bigglm.glm.result import contrast_maps

    config = _config(dataset, tmp_path / "out", "fsaverage5", noise)
    outcomes = run_analysis(config, client=local_client)
    assert [o.name for o in outcomes] == ["sub-01_task-x", "sub-02_task-x"]
    assert [o.n_runs for o in outcomes] == [2, 1]
    for outcome in outcomes:
        kept = sum(int(_kept(h).sum()) for h in VERTICES)
        assert outcome.n_voxels == kept
        assert len(outcome.maps) == len(CONTRASTS) * len(MAPS) * 2  # a file per hemisphere
        assert all(p.name.endswith("_statmap.shape.gii") for p in outcome.maps)
        result = _api_fit(config, outcome.name[4:6], noise)
        for name, expression in CONTRASTS.items():
            kind = "F" if isinstance(expression, list) else "t"
            api = contrast_maps(result.contrast(expression, kind=kind))
            label = {"a": "a", "a_minus_b": "aMinusB", "any": "any"}[name]
            for stat in MAPS:
                file_stat = kind if stat == "stat" else stat
                left = (
                    tmp_path / f"out/{outcome.name[:6]}/{outcome.name}_hemi-L_space-fsaverage5_"
                    f"contrast-{label}_stat-{file_stat}_statmap.shape.gii"
                )
                assert left in outcome.maps
                written = _gifti_maps(left)
                expected = _expected(_rows(api[stat].values))
                assert written.shape == expected.shape  # F: one row per contrast row
                np.testing.assert_allclose(written, expected, rtol=1e-6, atol=0)
        # the API's own writer names and fills the same files
        t_contrasts = {"a": "a", "a_minus_b": "a - b"}
        api_files = result.to_nifti(
            tmp_path / "api" / outcome.name, t_contrasts, prefix=f"{outcome.name}_space-fsaverage5"
        )
        ours = [p for p in outcome.maps if "_contrast-any_" not in p.name]
        assert sorted(p.name for p in api_files) == sorted(p.name for p in ours)
        for path in api_files:
            mine = outcome.maps[[p.name for p in outcome.maps].index(path.name)]
            np.testing.assert_allclose(
                nib.load(mine).darrays[0].data, nib.load(path).darrays[0].data, rtol=1e-6, atol=0
            )


def test_a_cifti_study_writes_dscalar_maps_with_the_brain_models(
    dataset: Path, tmp_path: Path, local_client: Any
) -> None:
    from bigglm.glm.result import contrast_maps

    config = _config(dataset, tmp_path / "out", "fsLR")
    (first, second) = run_analysis(config, client=local_client)
    models = _brain_models()
    for outcome in (first, second):
        assert outcome.n_voxels == len(models)
        assert len(outcome.maps) == len(CONTRASTS) * len(MAPS)
        result = _api_fit(config, outcome.name[4:6], "ols")
        api = contrast_maps(result.contrast("a - b"))
        for stat in MAPS:
            file_stat = "t" if stat == "stat" else stat
            path = (
                tmp_path / f"out/{outcome.name[:6]}/{outcome.name}_space-fsLR_den-91k_"
                f"contrast-aMinusB_stat-{file_stat}_statmap.dscalar.nii"
            )
            assert path in outcome.maps
            image = nib.load(path)
            assert isinstance(image, nib.Cifti2Image)
            assert image.nifti_header.get_intent()[0] == "ConnDenseScalar"
            assert image.header.get_axis(1) == models
            assert isinstance(image.header.get_axis(0), cifti2_axes.ScalarAxis)
            np.testing.assert_allclose(
                np.asarray(image.dataobj), _rows(api[stat].values), rtol=1e-6, atol=0
            )


def test_a_rerun_reuses_every_step_and_a_changed_hemisphere_converts_again(
    dataset: Path, tmp_path: Path, local_client: Any
) -> None:
    config = _config(dataset, tmp_path / "out", "fsaverage5")
    first = run_analysis(config, client=local_client)
    maps = sorted((tmp_path / "out").rglob("*.shape.gii"))  # and sub-01's vertex masks
    before = {p: p.stat().st_mtime_ns for p in maps}
    second = run_analysis(config, client=local_client)
    assert all(s["status"] == "ran" for o in first for s in o.steps.values())
    assert {s["status"] for o in second for s in o.steps.values()} == {"reused"}
    assert {p: p.stat().st_mtime_ns for p in maps} == before
    assert len([p for p in maps if p.name.endswith("_statmap.shape.gii")]) == 60
    assert len([p for p in maps if p.name.endswith("_desc-epi_mask.shape.gii")]) == 2

    # the right hemisphere of sub-02's run changes: its store, fit and maps are made again
    right = (
        dataset
        / "derivatives/sub-02/func/sub-02_task-x_run-1_hemi-R_space-fsaverage5_bold.func.gii"
    )
    saved = right.read_bytes()
    try:
        image = nib.load(right)
        for d in image.darrays:
            d.data[-1] += 1.0
        nib.save(image, right)
        third = run_analysis(config, client=local_client)
    finally:
        right.write_bytes(saved)
    steps = {o.name: {k: v["status"] for k, v in o.steps.items()} for o in third}
    assert set(steps["sub-01_task-x"].values()) == {"reused"}
    assert steps["sub-02_task-x"]["convert-sub-02_task-x_run-1"] == "ran"
    assert steps["sub-02_task-x"]["fit"] == "ran"


def test_later_runs_of_a_unit_take_the_first_runs_vertices(
    tmp_path: Path, local_client: Any
) -> None:
    """A vertex constant in run 2 only (no signal there) is kept in its store, as the
    first run's EPI mask is for volumes, so both runs have the same columns and fit."""
    root = _write_dataset(tmp_path / "data")
    left = (
        root / "derivatives/sub-01/func/sub-01_task-x_run-2_hemi-L_space-fsaverage5_bold.func.gii"
    )
    data = np.stack([d.data for d in nib.load(left).darrays])
    data[:, 50] = 600.0
    _write_gifti(left, data, "L")
    config = _config(root, tmp_path / "out", "fsaverage5")
    (outcome, _) = run_analysis(config, client=local_client)
    stores = sorted(config.store_folder.glob("sub-01_*_bold.zarr"))
    vertices = [bigglm.open_run(store)["vertex"].values for store in stores]
    assert len(stores) == 2 and 50 in vertices[1]
    np.testing.assert_array_equal(vertices[0], vertices[1])
    result = _api_fit(config, "01", "ols")
    z = outcome.maps[
        [p.name for p in outcome.maps].index(
            "sub-01_task-x_hemi-L_space-fsaverage5_contrast-a_stat-z_statmap.shape.gii"
        )
    ]
    expected = _expected(_rows(result.contrast("a")["z"].values))[:, : VERTICES["L"]]
    np.testing.assert_allclose(nib.load(z).darrays[0].data[None], expected, rtol=1e-6, atol=0)
    again = run_analysis(config, client=local_client)  # the masks written again, unchanged
    assert {s["status"] for o in again for s in o.steps.values()} == {"reused"}


def test_a_gifti_run_without_a_repetition_time_is_refused_before_any_work(
    tmp_path: Path, local_client: Any
) -> None:
    root = _write_dataset(tmp_path / "data")
    for sidecar in (root / "derivatives").rglob("sub-02_*_bold.json"):
        os.remove(sidecar)
    config = _config(root, tmp_path / "out", "fsaverage5")
    name = "sub-02_task-x_run-1_hemi-L_space-fsaverage5_bold.func.gii"
    with pytest.raises(ConfigError, match=f"no TR for {name}: .* add RepetitionTime"):
        run_analysis(config, client=local_client)
    assert not (tmp_path / "out" / "stores").exists()


def test_a_group_section_on_surfaces_is_refused_and_the_first_level_runs(
    dataset: Path, tmp_path: Path, local_client: Any
) -> None:
    config = _config(dataset, tmp_path / "out", "fsLR", group={})
    with pytest.raises(ConfigError, match="group level reads volume maps, and these runs"):
        run_analysis(config, client=local_client)
    assert not (tmp_path / "out").exists()  # refused before any work
    outcomes = run_analysis(config, client=local_client, level="first", subjects=["02"])
    assert [o.name for o in outcomes] == ["sub-02_task-x"]


def test_hemispheres_of_different_lengths_are_refused_before_any_work(
    tmp_path: Path, local_client: Any
) -> None:
    root = _write_dataset(tmp_path / "data")
    func = root / "derivatives/sub-02/func"
    right = func / "sub-02_task-x_run-1_hemi-R_space-fsaverage5_bold.func.gii"
    data = np.stack([d.data for d in nib.load(right).darrays])
    _write_gifti(right, data[:-4], "R")
    config = _config(root, tmp_path / "out", "fsaverage5")
    with pytest.raises(ConfigError, match=r"has 40 time points but .*hemi-R.* has 36; the hemi"):
        run_analysis(config, client=local_client)
    assert not (tmp_path / "out" / "stores").exists()


def test_a_mask_for_surface_runs_is_refused(dataset: Path, tmp_path: Path) -> None:
    from bigglm.pipeline import plan

    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(VOLUME, np.uint8), AFFINE), mask)
    config = _config(dataset, tmp_path / "out", "fsaverage5")
    inputs = {**config.inputs.model_dump(mode="json", exclude_none=True), "mask": str(mask)}
    config = _config(dataset, tmp_path / "out", "fsaverage5", inputs=inputs)
    with pytest.raises(ConfigError, match=r"a mask is given for .*, a surface run"):
        plan(config)


def test_residuals_of_surface_runs_are_refused_before_any_work(
    dataset: Path, tmp_path: Path
) -> None:
    from bigglm.pipeline import plan

    outputs = {"folder": str(tmp_path / "out"), "residuals": {"format": "zarr"}}
    config = _config(dataset, tmp_path / "out", "fsLR", outputs=outputs)
    with pytest.raises(ConfigError, match=r"outputs.residuals: .* is a surface run"):
        plan(config)
    assert not (tmp_path / "out").exists()


def test_an_explicit_gifti_run_of_one_hemisphere_is_refused(dataset: Path, tmp_path: Path) -> None:
    from bigglm.pipeline import plan

    left = next((dataset / "derivatives/sub-01/func").glob("*run-1_hemi-L_*.func.gii"))
    config = parse_config(
        {
            "inputs": {"runs": [{"bold": str(left), "tr": TR}]},
            "contrasts": {"c": "constant"},
            "outputs": {"folder": str(tmp_path / "out")},
        }
    )
    with pytest.raises(ConfigError, match=f"{left.name} is one hemisphere's GIFTI series"):
        plan(config)


def test_the_command_line_runs_a_surface_study(dataset: Path, tmp_path: Path) -> None:
    """``bigglm run study.yaml`` with ``space: fsLR``, in its own process and cluster."""
    import yaml

    bids = {"derivatives": str(dataset / "derivatives"), "raw": str(dataset / "raw")}
    config = {
        "inputs": {"bids": {**bids, "space": "fsLR"}, "confounds": ["trans_x"]},
        "model": {"noise": "ols"},
        "contrasts": {"a": "a"},
        "outputs": {"folder": str(tmp_path / "out"), "maps": ["z"], "report": True},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "bigglm.cli", "-q", "run", str(study), "--subject", "02"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    columns = len(_brain_models())  # 160 + 130 cortex vertices, 18 thalamus voxels
    assert f"sub-02_task-x: 1 run, 40 volumes, {columns} voxels" in done.stdout
    folder = tmp_path / "out/sub-02"
    z = folder / "sub-02_task-x_space-fsLR_den-91k_contrast-a_stat-z_statmap.dscalar.nii"
    assert nib.load(z).header.get_axis(1) == _brain_models()
    page = (folder / "sub-02_task-x_report.html").read_text()
    note = "No surface figures: the maps are CIFTI-2 grayordinates (e.g. fsLR), a mesh nilearn"
    assert f"<p class='note'>{note} does not ship.</p>" in page  # one line, no figure
    assert "surface z map" not in page
