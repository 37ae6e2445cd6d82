"""The group level of a workflow run (``group:`` in the YAML): maps, tables, resumption.

References written plainly here: the one-sample t of the subjects' effect maps (numpy),
the two-sample t by the textbook pooled-variance formula, and the uncorrected
permutation p of an exact sign-flip test enumerated over all 2^n flips.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from bigglm.config import parse_config
from bigglm.exceptions import ConfigError, DesignError
from bigglm.pipeline import map_path, run_analysis
from bigglm.pipeline.group import GroupOutcome

pytestmark = pytest.mark.cluster

SUBJECTS = ("01", "02", "03", "04", "05")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, make_tiny_bids: Any) -> Path:
    """Five subjects of the tiny dataset, and a participants table with two groups."""
    root = make_tiny_bids(tmp_path_factory.mktemp("study") / "dataset", SUBJECTS, n_scans=40)
    table = pd.DataFrame(
        {
            "participant_id": [f"sub-{s}" for s in SUBJECTS] + ["sub-99"],  # 99: no data
            "age": [21, 35, 48, 30, 52, 40],
            "group": ["control", "patient", "control", "patient", "control", "patient"],
        }
    )
    table.to_csv(root / "raw" / "participants.tsv", sep="\t", index=False)
    return root


def _config(tiny_config: Any, study: Path, out: Path, **group: Any) -> Any:
    sections = {"contrasts": {"a": "a"}, "group": group}
    return parse_config(tiny_config(study, out, **sections))


def _image(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _effects(config: Any) -> np.ndarray:
    """(subject, x, y, z): each subject's first-level effect map of contrast a."""
    units = [f"sub-{s}_task-tiny" for s in SUBJECTS]
    return np.stack([_image(map_path(config, u, "a", "effect")) for u in units])


@pytest.fixture(scope="module")
def one_sample(
    tmp_path_factory: pytest.TempPathFactory, study: Path, tiny_config: Any, local_client: Any
) -> tuple[Any, list[Any]]:
    out = tmp_path_factory.mktemp("one-sample") / "out"
    permutation = {"n_perm": 64, "seed": 3}  # 2^5 = 32 flips: exact
    config = _config(tiny_config, study, out, inference={"permutation": permutation})
    return config, run_analysis(config, client=local_client)


def test_one_sample_group_t_equals_the_plain_formula(one_sample: tuple[Any, list[Any]]) -> None:
    config, outcomes = one_sample
    group = outcomes[-1]
    assert isinstance(group, GroupOutcome) and group.subjects == 5
    folder = config.outputs.folder / "group" / "contrast-a"
    y = _effects(config)
    inside = np.isfinite(y).all(axis=0)
    n = y.shape[0]
    expected = y.mean(axis=0) / (y.std(axis=0, ddof=1) / np.sqrt(n))
    t = _image(folder / "group_contrast-mean_stat-t_statmap.nii.gz")
    effect = _image(folder / "group_contrast-mean_stat-effect_statmap.nii.gz")
    # float32 maps on disk: 1e-5 of each map's scale
    np.testing.assert_allclose(t[inside], expected[inside], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(effect[inside], y.mean(axis=0)[inside], rtol=1e-5, atol=1e-6)
    assert np.isnan(t[~inside]).all()
    assert sorted(p.name for p in group.maps if p.parent == folder) == sorted(
        p.name for p in folder.glob("group_*.nii.gz")
    )


def test_exact_permutation_p_values_equal_enumeration(one_sample: tuple[Any, list[Any]]) -> None:
    config, _ = one_sample
    folder = config.outputs.folder / "group" / "contrast-a"
    y = _effects(config)
    inside = np.isfinite(y).all(axis=0)
    data = y[:, inside]  # (subject, voxel)
    n = data.shape[0]

    def t_of(values: np.ndarray) -> np.ndarray:
        return values.mean(axis=0) / (values.std(axis=0, ddof=1) / np.sqrt(n))

    observed = t_of(data)
    exceed = np.zeros(data.shape[1])
    flips = list(itertools.product((1.0, -1.0), repeat=n))
    for signs in flips:
        flipped = t_of(np.asarray(signs)[:, None] * data)
        exceed += flipped >= observed - 1e-6 * np.abs(observed)  # ties within 1e-6 count
    p = exceed / len(flips)
    logp = _image(folder / "group_desc-permutation_contrast-mean_stat-logp_statmap.nii.gz")
    np.testing.assert_allclose(10 ** -logp[inside], p, rtol=1e-5)
    table = pd.read_csv(
        folder / "group_desc-permutation_contrast-mean_clusters.tsv", sep="\t", na_values="n/a"
    )
    assert {"Cluster ID", "X", "Y", "Z", "Peak Stat", "P(FWE) peak"} <= set(table.columns)


def test_parametric_threshold_map_and_table(one_sample: tuple[Any, list[Any]]) -> None:
    from scipy import stats

    config, _ = one_sample
    folder = config.outputs.folder / "group" / "contrast-a"
    z = _image(folder / "group_contrast-mean_stat-z_statmap.nii.gz")
    kept = _image(folder / "group_desc-thresholded_contrast-mean_stat-z_statmap.nii.gz")
    cut = stats.norm.isf(0.001 / 2)  # fpr, alpha 0.001, two-sided (nilearn's defaults)
    finite = np.isfinite(z)
    above = np.abs(z[finite]) >= cut
    np.testing.assert_array_equal(kept[finite][above], z[finite][above])
    assert np.all(kept[finite][~above] == 0)
    table = pd.read_csv(folder / "group_desc-thresholded_contrast-mean_clusters.tsv", sep="\t")
    assert len(table) >= 1 and table["Peak Stat"].abs().max() >= cut  # the planted effect


def test_rerun_reuses_the_group_step_and_a_changed_input_reruns_it(
    one_sample: tuple[Any, list[Any]], local_client: Any
) -> None:
    config, _ = one_sample
    again = run_analysis(config, client=local_client, level="group")
    assert len(again) == 1 and again[0].steps["contrast-a"]["status"] == "reused"
    z_path = map_path(config, "sub-02_task-tiny", "a", "effect")
    image = nib.load(z_path)
    changed = nib.Nifti1Image(np.asarray(image.dataobj) * 1.5, image.affine, image.header)
    nib.save(changed, z_path)  # the first level's output edited: the group must rerun
    rerun = run_analysis(config, client=local_client, level="group")
    assert rerun[0].steps["contrast-a"]["status"] == "ran"


def test_two_group_design_from_participants(
    study: Path, tiny_config: Any, local_client: Any, tmp_path: Path
) -> None:
    contrasts = {"patients_minus_controls": "group_patient - group_control"}
    config = _config(
        tiny_config,
        study,
        tmp_path / "out",
        design=["group"],
        contrasts=contrasts,
        inference={"height_control": None},
    )
    run_analysis(config, client=local_client)
    folder = config.outputs.folder / "group" / "contrast-a"
    y = _effects(config)
    patient = np.array([False, True, False, True, False])
    a, b = y[patient], y[~patient]
    pooled = ((len(a) - 1) * a.var(axis=0, ddof=1) + (len(b) - 1) * b.var(axis=0, ddof=1)) / 3
    expected = (a.mean(axis=0) - b.mean(axis=0)) / np.sqrt(pooled * (1 / len(a) + 1 / len(b)))
    t = _image(folder / "group_contrast-patientsMinusControls_stat-t_statmap.nii.gz")
    inside = np.isfinite(y).all(axis=0)
    np.testing.assert_allclose(t[inside], expected[inside], rtol=1e-5, atol=1e-5)
    assert not list(folder.glob("*thresholded*"))  # height_control: null writes no threshold


def test_plan_names_what_is_wrong_before_any_work(
    study: Path, tiny_config: Any, tmp_path: Path
) -> None:
    from bigglm.pipeline import plan
    from bigglm.pipeline.group import plan_group

    config = _config(tiny_config, study, tmp_path / "o", design=["age", "height"])
    with pytest.raises(DesignError, match="height"):
        plan_group(config, plan(config))
    config = _config(tiny_config, study, tmp_path / "o", contrasts={"x": "nonsense"})
    with pytest.raises(DesignError, match="nonsense"):
        plan_group(config, plan(config))
    config = _config(tiny_config, study, tmp_path / "o")
    with pytest.raises(ConfigError, match="needs at least 2"):
        plan_group(config, plan(config, ["01"]))
    assert not (tmp_path / "o").exists()


def test_group_section_checks_its_inputs(study: Path, tiny_config: Any, tmp_path: Path) -> None:
    base = tiny_config(study, tmp_path / "o")
    with pytest.raises(ConfigError, match="'nope' is not a first-level contrast"):
        parse_config({**base, "group": {"inputs": ["nope"]}})
    with pytest.raises(ConfigError, match="'any' is an F contrast"):
        parse_config({**base, "group": {"inputs": ["any"]}})
    outputs = {**base["outputs"], "maps": ["effect", "z"]}
    with pytest.raises(ConfigError, match=r"add variance to outputs\.maps"):
        parse_config({**base, "outputs": outputs, "group": {}})


def test_validate_and_level_first_at_the_command_line(
    study: Path, tiny_config: Any, tmp_path: Path
) -> None:
    group = {"design": ["intercept", "age"], "contrasts": {"age": "age"}}
    config = tiny_config(study, tmp_path / "out", contrasts={"a": "a"}, group=group)
    config["cluster"] = {"n_workers": 1}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "bigglm.cli"]
    shown = subprocess.run([*command, "validate", str(path)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "group: 5 subjects (" in shown.stdout and "design columns intercept, age" in shown.stdout
    first = subprocess.run(
        [*command, "run", str(path), "--level", "first", "-q"], capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert not (tmp_path / "out" / "group").exists()


@pytest.mark.parametrize("scheduler", ["slurm", "pbs", "sge"])
def test_submit_array_writes_the_group_job_after_it(
    study: Path, tiny_config: Any, tmp_path: Path, scheduler: str
) -> None:
    """A dry run (the SLURM dependency itself is tested on the CI SLURM)."""
    config = tiny_config(study, tmp_path / "out", contrasts={"a": "a"}, group={})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "bigglm.cli", "submit", str(path), "--mode", "array"]
    done = subprocess.run(
        [*command, "--scheduler", scheduler, "--dry-run"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    script = tmp_path / "out" / ".bigglm" / "jobs" / f"group.{scheduler}.sh"
    assert f"wrote {script} (the group level, after the array); not submitted" in done.stdout
    text = script.read_text()
    assert text.rstrip().endswith(f"run {path.resolve()} --level group")
    assert "bigglm-group" in text and oct(script.stat().st_mode & 0o777) == "0o700"


def _reml_mean(y: np.ndarray, s: np.ndarray) -> float:
    """The one-sample mixed-effects mean at one voxel, by a plain bounded search of the
    restricted likelihood over tau2 (variances s_i + tau2), written out here."""
    from scipy.optimize import minimize_scalar

    def minus_reml(tau2: float) -> float:
        w = 1.0 / (s + tau2)
        mean = np.sum(w * y) / np.sum(w)
        return 0.5 * (-np.sum(np.log(w)) + np.log(np.sum(w)) + np.sum(w * (y - mean) ** 2))

    top = 10.0 * float(np.var(y) + s.max())
    tau2 = minimize_scalar(
        minus_reml, bounds=(0.0, top), method="bounded", options={"xatol": 1e-12}
    ).x
    w = 1.0 / (s + tau2)
    return float(np.sum(w * y) / np.sum(w))


def test_mixed_model_takes_the_first_level_variances(
    study: Path, tiny_config: Any, local_client: Any, tmp_path: Path
) -> None:
    config = _config(
        tiny_config, study, tmp_path / "out", model="mixed", inference={"height_control": None}
    )
    run_analysis(config, client=local_client)
    units = [f"sub-{s}_task-tiny" for s in SUBJECTS]
    y = _effects(config)
    s = np.stack([_image(map_path(config, u, "a", "variance")) for u in units])
    folder = config.outputs.folder / "group" / "contrast-a"
    effect = _image(folder / "group_contrast-mean_stat-effect_statmap.nii.gz")
    inside = np.argwhere(np.isfinite(y).all(axis=0))
    scale = float(np.nanmax(np.abs(y)))
    weighted = 0
    for i, j, k in inside[:: max(1, len(inside) // 12)]:  # a dozen voxels across the volume
        expected = _reml_mean(y[:, i, j, k], s[:, i, j, k])
        # REML's optimum is flat in tau2; the mean moves little with it: 1e-5 of the scale
        assert effect[i, j, k] == pytest.approx(expected, rel=1e-5, abs=1e-5 * scale)
        weighted += abs(expected - y[:, i, j, k].mean()) > 1e-3 * scale
    assert weighted >= 3  # the variances matter here: the plain mean would fail the check
