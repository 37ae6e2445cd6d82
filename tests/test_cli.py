"""The command line: run, validate, submit, demo and fit; errors are one line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from bigglm.cli import main


def _bigglm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bigglm.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        timeout=300,
    )


def _one_line_error(done: subprocess.CompletedProcess[str], command: str) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"bigglm {command}: error: ")
    return lines[0]


def _yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_help_lists_the_workflow_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "validate", "submit", "demo", "fit"):
        assert f"    {command}" in out


def test_bad_config_is_one_line_with_the_field_and_fix(tmp_path: Path) -> None:
    config = tmp_path / "a.yaml"
    config.write_text(
        "inputs: {runs: [{bold: b.nii}]}\noutputs: {folder: o}\nmodel: {noise: ar 1}\n"
    )
    line = _one_line_error(_bigglm("validate", str(config)), "validate")
    assert line.endswith(
        "model.noise: 'ar 1' is not a noise model; use 'ols' or 'arN' (e.g. 'ar1')"
    )


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    line = _one_line_error(_bigglm("run", str(tmp_path / "nope.yaml")), "run")
    assert "nope.yaml: cannot read the configuration" in line


def test_bad_events_file_is_one_line_naming_file_and_row(
    tiny_bids: Path, tiny_config: Any, tmp_path: Path
) -> None:
    events = tiny_bids / "raw/sub-01/func/sub-01_task-tiny_events.tsv"
    events.write_text("onset\tduration\ttrial_type\n0\tlong\ta\n")
    config = _yaml(tmp_path / "a.yaml", tiny_config(tiny_bids, tmp_path / "out"))
    line = _one_line_error(_bigglm("validate", str(config)), "validate")
    assert "sub-01_task-tiny" in line and "duration" in line


def test_validate_reports_runs_and_contrasts(
    tiny_bids: Path, tiny_config: Any, tmp_path: Path
) -> None:
    config = _yaml(tmp_path / "a.yaml", tiny_config(tiny_bids, tmp_path / "out"))
    done = _bigglm("validate", str(config))
    assert done.returncode == 0, done.stderr
    assert "sub-01_task-tiny: sub-01_task-tiny: 60 volumes, TR 2 s" in done.stdout
    assert "valid: 2 units, 2 runs, contrasts: a, a_minus_b, any; cluster: local" in done.stdout
    assert not (tmp_path / "out").exists()  # validate writes nothing


@pytest.mark.cluster
def test_run_prints_a_summary_and_resumes(
    tiny_bids: Path, tiny_config: Any, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_bids, tmp_path / "out", cluster={"profile": "local", "n_workers": 1})
    cfg["inputs"]["bids"]["subjects"] = ["01"]
    config = _yaml(tmp_path / "a.yaml", cfg)
    first = _bigglm("-q", "run", str(config))
    assert first.returncode == 0, first.stderr
    assert "sub-01_task-tiny: 1 run, 60 volumes, 512 voxels" in first.stdout
    assert "fit ran" in first.stdout
    second = _bigglm("-q", "run", str(config))
    assert (
        "fit reused" in second.stdout
        and "ran" not in second.stdout.split("steps:")[1].split("\n")[0]
    )


@pytest.mark.cluster
def test_fit_command_writes_maps_without_yaml(tiny_bids: Path, tmp_path: Path) -> None:
    import bigglm

    func = tiny_bids / "derivatives/sub-01/func"
    store = bigglm.convert(
        func / "sub-01_task-tiny_desc-preproc_bold.nii.gz",
        tmp_path / "run.zarr",
        mask=func / "sub-01_task-tiny_desc-brain_mask.nii.gz",
    )
    events = tiny_bids / "raw/sub-01/func/sub-01_task-tiny_events.tsv"
    contrasts = ["--contrast", "a_minus_b=a - b", "--contrast", "any=a; b"]
    options = ["--events", str(events), "--noise", "ols", *contrasts]
    out = ["--residuals", "raw", "--output", str(tmp_path / "maps")]
    done = _bigglm("fit", str(store), *options, *out)
    assert done.returncode == 0, done.stderr
    assert "wrote 9 images" in done.stdout  # effect, variance, stat, z per contrast; residuals
    residuals = np.asarray(nib.load(tmp_path / "maps/run_desc-residuals_bold.nii.gz").dataobj)
    inside = np.asarray(nib.load(func / "sub-01_task-tiny_desc-brain_mask.nii.gz").dataobj) > 0
    assert residuals.shape == (*inside.shape, 60)
    series = residuals[inside]  # (voxel, time); OLS residuals of a design with a constant
    assert np.all(np.abs(series.mean(axis=1)) <= 1e-4 * series.std(axis=1))
    assert np.isnan(residuals[~inside]).all()
    z = np.asarray(nib.load(tmp_path / "maps/contrast-aMinusB_stat-z_statmap.nii.gz").dataobj)
    f = np.asarray(nib.load(tmp_path / "maps/contrast-any_stat-stat_statmap.nii.gz").dataobj)
    mask = np.asarray(nib.load(func / "sub-01_task-tiny_desc-brain_mask.nii.gz").dataobj) > 0
    # The tiny dataset's truth: condition a is active (effect 3, noise SD 1) in x < 5 only.
    assert np.median(z[:5][mask[:5]]) > 3 and abs(np.median(z[5:][mask[5:]])) < 1.5
    assert np.all(f[mask] >= 0)
    f_effect = nib.load(tmp_path / "maps/contrast-any_stat-effect_statmap.nii.gz")
    assert f_effect.shape == (*mask.shape, 2)  # one volume per F row: a, b


def test_fit_command_bad_contrast_option_is_one_line(tmp_path: Path) -> None:
    line = _one_line_error(
        _bigglm("fit", str(tmp_path / "x.zarr"), "--contrast", "oops", "--output", str(tmp_path)),
        "fit",
    )
    assert "write NAME=EXPRESSION" in line


@pytest.mark.parametrize(
    ("contrasts", "message"),
    [
        (["d=a", "d=b"], "--contrast 'd=b': the name 'd' is given twice"),
        (["a_b=a", "aB=b"], "'a_b' and 'aB' give the same file label 'aB'"),
        (["../../x=a"], "contrast name '../../x' holds a path separator or '..'"),
    ],
)
def test_fit_command_refuses_contrast_names_in_one_line(
    tmp_path: Path, contrasts: list[str], message: str
) -> None:
    options = [item for c in contrasts for item in ("--contrast", c)]
    done = _bigglm("fit", str(tmp_path / "x.zarr"), *options, "--output", str(tmp_path / "o"))
    assert message in _one_line_error(done, "fit")
    assert not (tmp_path / "o").exists()


def test_fit_stores_checks_contrasts_before_fitting(tmp_path: Path) -> None:
    """A contrast the design cannot give is refused before the (long) fit: no glm.zarr."""
    import bigglm
    from bigglm.exceptions import DesignError
    from bigglm.pipeline import fit_stores

    bold = np.random.default_rng(0).normal(100, 1, size=(2, 2, 1, 20)).astype("float32")
    nib.save(nib.Nifti1Image(bold, np.eye(4)), tmp_path / "bold.nii")
    mask = np.ones((2, 2, 1), bool)
    store = bigglm.convert(tmp_path / "bold.nii", tmp_path / "bold.zarr", mask=mask, tr=2.0)
    events = tmp_path / "events.tsv"
    events.write_text("onset\tduration\ttrial_type\n0\t4\ta\n20\t4\tb\n")
    with pytest.raises(DesignError, match=r"contrast 'd': .*names 'zz', not a design column"):
        fit_stores([store], tmp_path / "o", events=[events], contrasts=["d=a - zz"])
    assert not (tmp_path / "o" / "glm.zarr").exists()


@pytest.mark.parametrize(
    ("contrast", "message"),
    [
        (["a", "2*a"], "contrasts.any: the 2 rows of the F contrast are linearly dependent"),
        ("3", "contrasts.any: contrast '3' names no design column"),
        ("a - a", "contrasts.any: the contrast is all zeros"),
    ],
)
def test_validate_catches_contrasts_the_fit_would_refuse(
    tiny_bids: Path, tiny_config: Any, tmp_path: Path, contrast: object, message: str
) -> None:
    config = tiny_config(tiny_bids, tmp_path / "out", contrasts={"any": contrast})
    line = _one_line_error(_bigglm("validate", str(_yaml(tmp_path / "a.yaml", config))), "validate")
    assert message in line


def test_submit_without_a_batch_profile_is_one_line(
    tiny_bids: Path, tiny_config: Any, tmp_path: Path
) -> None:
    config = _yaml(tmp_path / "a.yaml", tiny_config(tiny_bids, tmp_path / "out"))
    line = _one_line_error(_bigglm("submit", str(config)), "submit")
    assert "not a batch system; set it to 'slurm', 'pbs' or 'sge', or pass --scheduler" in line


def test_submit_dry_run_for_pbs_and_sge(tiny_bids: Path, tiny_config: Any, tmp_path: Path) -> None:
    config = _yaml(tmp_path / "a.yaml", tiny_config(tiny_bids, tmp_path / "out"))
    for scheduler, array_line in (("pbs", "#PBS -J 0-1"), ("sge", "#$ -t 1-2")):
        done = _bigglm(
            "submit", str(config), "--scheduler", scheduler, "--mode", "array", "--dry-run"
        )
        assert done.returncode == 0, done.stderr
        script = tmp_path / "out/.bigglm/jobs" / f"array.{scheduler}.sh"
        text = script.read_text()
        assert array_line in text and "--subject" in text
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
