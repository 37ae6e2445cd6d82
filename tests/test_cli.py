"""The command line: run, validate, submit, demo and fit; errors are one line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def _one_subject_yaml(tiny_config: Any, dataset: Path, tmp_path: Path, *, n_workers: int) -> Path:
    """``tmp_path/a.yaml``: subject 01 alone on a local cluster, writing to ``tmp_path/out``."""
    cfg = tiny_config(
        dataset, tmp_path / "out", cluster={"profile": "local", "n_workers": n_workers}
    )
    cfg["inputs"]["bids"]["subjects"] = ["01"]
    return _yaml(tmp_path / "a.yaml", cfg)


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
        "model.noise: 'ar 1' is not a noise model; use 'ols', 'arN' (e.g. 'ar1'), "
        "'spm-ar1' or 'film'"
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
    config = _one_subject_yaml(tiny_config, tiny_bids, tmp_path, n_workers=1)
    first = _bigglm("-q", "run", str(config))
    assert first.returncode == 0, first.stderr
    assert "sub-01_task-tiny: 1 run, 60 volumes, 512 voxels" in first.stdout
    assert "fit ran" in first.stdout
    second = _bigglm("run", str(config), "-q")  # a global flag after the sub-command
    assert second.returncode == 0, second.stderr
    assert " INFO " not in first.stderr + second.stderr
    assert (
        "fit reused" in second.stdout
        and "ran" not in second.stdout.split("steps:")[1].split("\n")[0]
    )


@pytest.mark.cluster
def test_fit_command_writes_maps_without_yaml(
    tiny_bids: Path, tiny_store: tuple[Path, Path], tmp_path: Path
) -> None:
    func = tiny_bids / "derivatives/sub-01/func"
    store, events = tiny_store
    contrasts = ["--contrast", "a_minus_b=a - b", "--contrast", "any=a; b"]
    options = ["--events", str(events), "--noise", "ols", *contrasts]
    out = ["--residuals", "raw", "--output", str(tmp_path / "maps")]
    done = _bigglm("fit", str(store), *options, *out)
    assert done.returncode == 0, done.stderr
    assert "wrote 9 images" in done.stdout  # effect, variance, t or F, z per contrast; residuals
    residuals = np.asarray(nib.load(tmp_path / "maps/run_desc-residuals_bold.nii.gz").dataobj)
    inside = np.asarray(nib.load(func / "sub-01_task-tiny_desc-brain_mask.nii.gz").dataobj) > 0
    assert residuals.shape == (*inside.shape, 60)
    series = residuals[inside]  # (voxel, time); OLS residuals of a design with a constant
    assert np.all(np.abs(series.mean(axis=1)) <= 1e-4 * series.std(axis=1))
    assert np.isnan(residuals[~inside]).all()
    z = np.asarray(nib.load(tmp_path / "maps/contrast-aMinusB_stat-z_statmap.nii.gz").dataobj)
    f = np.asarray(nib.load(tmp_path / "maps/contrast-any_stat-F_statmap.nii.gz").dataobj)
    assert sorted(p.name for p in (tmp_path / "maps").glob("*_statmap.nii.gz")) == sorted(
        f"contrast-{label}_stat-{stat}_statmap.nii.gz"
        for label, kind in (("aMinusB", "t"), ("any", "F"))
        for stat in ("effect", "variance", kind, "z")
    )  # the statistic named as the Python API names it, never stat-stat
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


def test_a_library_error_names_the_option_and_the_cli_its_flag(
    tiny_bids: Path, tiny_config: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bigglm.pipeline speaks of ``subjects`` (its keyword); ``bigglm validate`` of
    ``--subject`` (its flag), translating the message where it catches it."""
    from bigglm.config import parse_config
    from bigglm.exceptions import ConfigError
    from bigglm.pipeline import plan

    config = tiny_config(tiny_bids, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^subjects 99: no run of these subjects") as info:
        plan(parse_config(config), ["99"])
    assert "--" not in str(info.value)
    line = _main_one_line(
        capsys, "validate", str(_yaml(tmp_path / "a.yaml", config)), "--subject", "99"
    )
    assert "error: --subject 99: no run of these subjects; check the labels" in line


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


# --- the weak cases: one line, exit 2, nothing written ----------------------------------------


def _main_one_line(capsys: pytest.CaptureFixture[str], command: str, *args: str) -> str:
    """Run ``main`` in this process; the one stderr line of its exit-2 error."""
    capsys.readouterr()
    status = main([command, *args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bigglm {command}: error: ")
    return lines[0]


def _sidecar(dataset: Path, **fields: object) -> None:
    import json

    path = dataset / "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.json"
    path.write_text(json.dumps({"RepetitionTime": 2.0, **fields}))


def _infinite_confound(dataset: Path) -> None:
    import pandas as pd

    path = dataset / "derivatives/sub-01/func/sub-01_task-tiny_desc-confounds_timeseries.tsv"
    table = pd.read_csv(path, sep="\t", na_values=["n/a"])
    table.loc[5, "trans_x"] = np.inf
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")


def _moved_mask(dataset: Path, tmp_path: Path) -> dict[str, object]:
    bold = nib.load(dataset / "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.nii.gz")
    affine = bold.affine.copy()
    affine[:3, 3] += 30.0  # same shape, another place
    mask = tmp_path / "moved_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(bold.shape[:3], np.uint8), affine), mask)
    return {"mask": str(mask)}


#: name -> (change to the tiny dataset or config, fragment of the one-line message)
WEAK_VALIDATE: dict[str, tuple[Any, str]] = {
    "high_pass 1e308": (lambda d, c, t: c["model"].update(high_pass=1e308), "Nyquist"),
    "oversampling 1e12": (lambda d, c, t: c["model"].update(oversampling=10**12), "oversampling"),
    "tr 1e300": (lambda d, c, t: _sidecar(d, RepetitionTime=1e300), "tr=1e+300 s is out of range"),
    "RepetitionTime two": (lambda d, c, t: _sidecar(d, RepetitionTime="two"), "'two'"),
    "RepetitionTime [2]": (lambda d, c, t: _sidecar(d, RepetitionTime=[2]), "RepetitionTime [2]"),
    "negative fir_delays": (
        lambda d, c, t: c["model"].update(hrf="fir", fir_delays=[-1, 2]),
        "-1 is negative",
    ),
    "min_onset nan": (lambda d, c, t: c["model"].update(min_onset=float("nan")), "min_onset"),
    "drift_order 100000": (
        lambda d, c, t: c["model"].update(drift="polynomial", drift_order=100000),
        "drift_order=100000 needs more than 100000 scans",
    ),
    "ar100000": (lambda d, c, t: c["model"].update(noise="ar100000"), "AR(100000) noise"),
    "more regressors than scans": (
        lambda d, c, t: c["model"].update(high_pass=0.24),
        "the design has 62 regressors but only 60 scans",
    ),
    "regressors and AR order beyond the scans": (
        lambda d, c, t: c["model"].update(high_pass=0.2, noise="ar5"),
        "60 volumes, too few for 53 regressors and AR(5) noise",
    ),
    "empty events": (
        lambda d, c, t: (d / "raw/sub-01/func/sub-01_task-tiny_events.tsv").write_text(""),
        "is empty",
    ),
    "Inf confound": (lambda d, c, t: _infinite_confound(d), "'trans_x' is inf in row 5"),
    "outputs.folder is a file": (
        lambda d, c, t: (
            (t / "results.txt").write_text("") or c["outputs"].update(folder=str(t / "results.txt"))
        ),
        "exists and is not a folder",
    ),
    # bigglm made .bigglm and sub-01 inside the store before refusing to write there
    "outputs.folder in a store": (
        lambda d, c, t: c["outputs"].update(folder=str(_a_store(d, t) / "results")),
        "outputs.folder: {t}/run.zarr/results is inside the bigglm run-store {t}/run.zarr",
    ),
    "store.folder is a store": (
        lambda d, c, t: c.update(store={"folder": str(_a_store(d, t))}),
        "store.folder: {t}/run.zarr is inside the bigglm run-store {t}/run.zarr",
    ),
    "mask with another affine": (
        lambda d, c, t: c["inputs"].update(_moved_mask(d, t)),
        "has another affine",
    ),
}


@pytest.mark.parametrize("case", list(WEAK_VALIDATE))
def test_validate_catches_the_weak_cases_in_one_line(
    case: str, tiny_bids: Path, tiny_config: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, fragment = WEAK_VALIDATE[case]
    cfg = tiny_config(tiny_bids, tmp_path / "out")
    change(tiny_bids, cfg, tmp_path)
    config = _yaml(tmp_path / "a.yaml", cfg)
    started = time.perf_counter()
    before = _files(tmp_path / "run.zarr")
    line = _main_one_line(capsys, "validate", str(config))
    assert fragment.format(t=tmp_path) in line
    assert time.perf_counter() - started < 30  # drift_order=100000 used to hang
    assert not (tmp_path / "out").exists()
    assert _files(tmp_path / "run.zarr") == before


def _a_store(dataset: Path, tmp: Path) -> Path:
    """A run store bigglm wrote, at ``tmp/run.zarr``."""
    import bigglm

    bold = dataset / "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.nii.gz"
    return bigglm.convert(bold, tmp / "run.zarr", tr=2.0)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--noise", "ar0"], "noise: 'ar0' is not a noise model"),
        (["--hrf", "spam"], "hrf: 'spam' is not allowed; use one of 'spm'"),
        (["--high-pass", "-1"], "high_pass=-1.0 Hz must be positive"),
        (["--high-pass", "0"], "high_pass=0.0 Hz must be positive"),  # dropped the drifts
    ],
)
def test_fit_flags_are_checked_like_the_yaml(
    flags: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _main_one_line(capsys, "fit", "run.zarr", *flags, "--output", str(tmp_path / "maps"))
    assert fragment in line and "pydantic" not in line
    assert not (tmp_path / "maps").exists()


def test_demo_with_too_few_scans_gives_the_minimum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _main_one_line(capsys, "demo", "--scans", "5", "--output", str(tmp_path / "demo"))
    assert "needs at least 40 volumes" in line and "got 5" in line
    assert not (tmp_path / "demo").exists()


def test_a_fifo_config_is_one_line_and_does_not_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "no such file"
    os.mkfifo(fifo)
    line = _main_one_line(capsys, "validate", str(fifo))
    assert "is a named pipe (FIFO)" in line


def test_a_fifo_source_is_not_called_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "no such file"
    os.mkfifo(fifo)
    line = _main_one_line(capsys, "convert", str(fifo), "--store", str(tmp_path / "s.zarr"))
    assert "is a named pipe (FIFO), not a regular file" in line


def test_system_errors_are_one_line_with_the_path_and_reason() -> None:
    from bigglm.cli import USER_ERRORS, _one_line

    with pytest.raises(OSError) as info, open("/dev/full", "w") as full:  # a real ENOSPC
        full.write("x")
        full.flush()
    assert isinstance(info.value, USER_ERRORS)
    assert _one_line(info.value) == "No space left on device (ENOSPC)"
    named = OSError(30, "Read-only file system", "/data/results")
    assert _one_line(named) == "/data/results: Read-only file system (EROFS)"


def test_a_read_only_target_is_one_line(
    functional_nii: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _main_one_line(capsys, "convert", str(functional_nii), "--store", "/proc/x.zarr")
    assert "/proc/" in line


@pytest.mark.parametrize(
    ("args", "verbosity"),
    [
        (["validate", "a.yaml"], 0),
        (["-q", "validate", "a.yaml"], -1),
        (["validate", "a.yaml", "-q"], -1),
        (["validate", "-v", "a.yaml"], 1),
        (["-v", "run", "a.yaml"], 1),
        (["fit", "s.zarr", "--output", "o", "--quiet"], -1),
    ],
)
def test_quiet_and_verbose_work_before_and_after_the_command(
    args: list[str], verbosity: int
) -> None:
    from bigglm.cli import _build_parser

    assert _build_parser().parse_args(args).verbosity == verbosity


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_flags_work_before_and_after_the_command_at_the_entry_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """``bigglm convert ... -q`` is ``bigglm -q convert ...``; the same for -v, --version."""
    series = np.random.default_rng(0).normal(100, 1, (4, 4, 3, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(series, np.eye(4)), tmp_path / "bold.nii")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3), np.uint8), np.eye(4)), tmp_path / "mask.nii")

    def bigglm(source: str, store: str, *flags: str) -> tuple[int, Any]:
        command = ["convert", str(tmp_path / source), "--store", str(tmp_path / store)]
        command += ["--mask", str(tmp_path / "mask.nii"), "--tr", "2"]
        code = main([*flags, *command] if where == "before" else [*command, *flags])
        return code, capsys.readouterr()

    code, plain = bigglm("bold.nii", "plain.zarr")
    assert code == 0 and " INFO convert plain.zarr: " in plain.err  # progress as log lines
    code, quiet = bigglm("bold.nii", "quiet.zarr", "-q")
    assert code == 0 and "INFO" not in quiet.err and quiet.out.strip().endswith("quiet.zarr")
    code, verbose = bigglm("missing.nii", "x.zarr", "--verbose")
    assert code == 2 and "Traceback" in verbose.err  # -v: tracebacks on errors
    with pytest.raises(SystemExit) as info:
        bigglm("bold.nii", "x.zarr", "--version")
    assert info.value.code == 0 and capsys.readouterr().out.startswith("bigglm ")


@pytest.mark.parametrize(
    "command", [[], ["run"], ["validate"], ["submit"], ["demo"], ["fit"], ["convert"]]
)
def test_help_lists_the_global_options_for_every_command(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "global options (before or after the command)" in out
    for flag in ("-q, --quiet", "-v, --verbose", "--version"):
        assert flag in out


def test_tracebacks_of_a_closing_client_are_kept_off_stderr() -> None:
    """What a Ctrl-C left on stderr under Python 3.13 (CI, newest environment): tornado's
    "Exception in callback" for a future ``as_completed`` still tracked when the client's
    connection closed. The CLI's filter drops it, and only it."""
    import logging

    from distributed.comm import CommClosedError

    from bigglm.cli import _logging_to_stderr

    def record(message: str, error: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "tornado.application",
            logging.ERROR,
            __file__,
            1,
            message,
            (),
            (type(error), error, None),
        )

    closed = CommClosedError("in <TCP (closed) ConnectionPool.gather>: Stream is closed")
    tracked = (
        "Exception in callback functools.partial(<...>, "
        "<Task finished coro=<as_completed._track_future() ...>)"
    )
    tornado = logging.getLogger("tornado.application")
    with _logging_to_stderr(0):
        assert not all(f.filter(record(tracked, closed)) for f in tornado.filters)
        assert all(
            f.filter(record("Exception in callback other()", closed)) for f in tornado.filters
        )
        assert all(f.filter(record(tracked, ValueError("a real bug"))) for f in tornado.filters)
    assert tornado.filters == []  # removed when the command ends


@pytest.mark.cluster
def test_ctrl_c_during_run_is_one_line_and_exit_130(
    tiny_bids: Path, tiny_config: Any, tmp_path: Path
) -> None:
    import signal

    config = _one_subject_yaml(tiny_config, tiny_bids, tmp_path, n_workers=2)
    run = subprocess.Popen(
        [sys.executable, "-m", "bigglm.cli", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    assert run.stderr is not None
    seen = []
    for line in run.stderr:
        seen.append(line)
        if ": fit ..." in line:  # the fit has started on the workers
            time.sleep(0.5)
            os.killpg(run.pid, signal.SIGINT)  # Ctrl-C reaches the workers too
            break
    rest = run.stderr.read()
    assert run.wait(timeout=120) == 130, "".join(seen) + rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert "Warning" not in rest and "WARNING" not in rest, rest
    assert rest.strip().splitlines()[-1] == "bigglm run: interrupted"
    assert not list((tmp_path / "out").rglob("*_statmap.nii.gz"))
