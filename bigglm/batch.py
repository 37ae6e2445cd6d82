"""Batch submission for ``bigglm submit``: SLURM, PBS or SGE job scripts, submitted.

Two modes:

- ``driver``: one job runs ``bigglm run CONFIG``; when the configuration's cluster profile
  is a batch system, that driver starts its Dask workers as further batch jobs
  (dask-jobqueue), otherwise it computes on a local cluster inside its own allocation.
- ``array``: one array task per subject, each running ``bigglm run CONFIG --subject S
  --profile local`` on a local cluster sized to the task's cores. Subjects write to their
  own output folders, so tasks never share a lock. With a ``group`` section, one more
  job runs ``bigglm run CONFIG --level group`` after every task succeeded (SLURM
  ``--dependency=afterok``, PBS ``depend=afterokarray``, SGE ``-hold_jid``).

Scripts and the subject list are written to ``<outputs>/.bigglm/jobs/`` and job logs to
``<outputs>/logs/``, both folders readable by the user only (mode 0700); the scripts can
be read, edited and submitted by hand. A driver job's Dask cluster writes its per-run
TLS credentials under ``<outputs>/.bigglm/credentials/`` (:mod:`bigglm.security`).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bigglm.config import AnalysisConfig
from bigglm.exceptions import ConfigError

__all__ = ["Submission", "job_script", "scheduler_of", "submit"]

logger = logging.getLogger(__name__)

Scheduler = Literal["slurm", "pbs", "sge"]
SubmitMode = Literal["driver", "array"]
#: What a job script runs: the two submit modes, and the group level after an array.
ScriptMode = Literal["driver", "array", "group"]

_SUBMIT_COMMAND = {"slurm": ["sbatch", "--parsable"], "pbs": ["qsub"], "sge": ["qsub", "-terse"]}
#: Shell expression of the 0-based array index, per scheduler.
_INDEX = {
    "slurm": "${SLURM_ARRAY_TASK_ID}",
    "pbs": "${PBS_ARRAY_INDEX:-${PBS_ARRAYID}}",
    "sge": "$((SGE_TASK_ID - 1))",
}


@dataclass(frozen=True)
class Submission:
    """A submitted job: its id, the script, and what it runs.

    ``group`` is the group-level job of an ``array`` submission whose configuration has
    a ``group`` section: it runs ``bigglm run CONFIG --level group`` once every array task
    succeeded (``afterok``), or ``None``.
    """

    job_id: str
    script: Path
    mode: SubmitMode
    tasks: int
    group: Submission | None = None


def scheduler_of(config: AnalysisConfig, given: str | None = None) -> Scheduler:
    """The batch system to submit to: ``given``, else the cluster profile's.

    Parameters
    ----------
    config : AnalysisConfig
        The analysis.
    given : str, optional
        ``slurm``, ``pbs`` or ``sge`` (``bigglm submit --scheduler``).

    Returns
    -------
    str

    Raises
    ------
    ConfigError
        If neither names a batch system.

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "b.nii"}]}, "outputs": {"folder": "o"},
    ...                     "cluster": {"profile": "pbs"}})
    >>> scheduler_of(cfg)
    'pbs'
    """
    kind = given or config.cluster.profile
    if kind not in ("slurm", "pbs", "sge"):
        raise ConfigError(
            f"cluster.profile is {config.cluster.profile!r}, not a batch system; set it to "
            "'slurm', 'pbs' or 'sge', or pass scheduler=..."
        )
    return kind  # type: ignore[return-value]


def _megabytes(memory: str) -> int:
    from dask.utils import parse_bytes

    return max(1, parse_bytes(memory) // 2**20)


def _directives(
    kind: Scheduler,
    name: str,
    cores: int,
    memory: str,
    walltime: str,
    logs: Path,
    tasks: int | None,
    queue: str | None,
    account: str | None,
) -> list[str]:
    mb = _megabytes(memory)
    if kind == "slurm":
        log = logs / ("%x-%A_%a.out" if tasks else "%x-%j.out")
        lines = [f"--job-name={name}", f"--cpus-per-task={cores}", f"--mem={mb}M"]
        lines += [f"--time={walltime}", f"--output={log}"]
        lines += [f"--array=0-{tasks - 1}"] if tasks else []
        lines += [f"--partition={queue}"] if queue else []
        lines += [f"--account={account}"] if account else []
        return [f"#SBATCH {line}" for line in lines]
    if kind == "pbs":
        lines = [f"-N {name}", f"-l select=1:ncpus={cores}:mem={mb}mb", f"-l walltime={walltime}"]
        lines += [f"-o {logs}", "-j oe"] + ([f"-J 0-{tasks - 1}"] if tasks else [])
        lines += [f"-q {queue}"] if queue else []
        lines += [f"-A {account}"] if account else []
        return [f"#PBS {line}" for line in lines]
    lines = [f"-N {name}", f"-pe smp {cores}", f"-l h_vmem={mb}M", f"-l h_rt={walltime}"]
    lines += [f"-o {logs}", "-j y", "-cwd"] + ([f"-t 1-{tasks}"] if tasks else [])
    lines += [f"-q {queue}"] if queue else []
    lines += [f"-P {account}"] if account else []
    return [f"#$ {line}" for line in lines]


def job_script(
    config_path: str | Path,
    config: AnalysisConfig,
    *,
    scheduler: Scheduler,
    mode: ScriptMode,
    subjects_file: Path | None = None,
    n_tasks: int | None = None,
) -> str:
    """The text of the batch script for one submission.

    Parameters
    ----------
    config_path : str or Path
        The YAML file the job runs.
    config : AnalysisConfig
        Its contents (resources come from ``cluster.submit``, queue and account from
        ``cluster``).
    scheduler : {"slurm", "pbs", "sge"}
    mode : {"driver", "array", "group"}
        ``group``: ``bigglm run CONFIG --level group``, the job that follows an array.
    subjects_file : Path, optional
        For ``array``: one subject label per line, task i runs line i + 1.
    n_tasks : int, optional
        For ``array``: the number of tasks.

    Returns
    -------
    str
        A bash script with the scheduler's directives.

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "b.nii"}]}, "outputs": {"folder": "/o"},
    ...                     "cluster": {"profile": "slurm", "queue": "short"}})
    >>> text = job_script("/a.yaml", cfg, scheduler="slurm", mode="driver")
    >>> [line for line in text.splitlines() if "partition" in line or "bigglm" in line][:2]
    ['#SBATCH --job-name=bigglm-run', '#SBATCH --partition=short']
    """
    cluster, resources = config.cluster, config.cluster.submit
    logs = config.outputs.folder / "logs"
    array = mode == "array"
    name = {"array": "bigglm-subject", "driver": "bigglm-run", "group": "bigglm-group"}[mode]
    head = _directives(
        scheduler,
        name,
        resources.cores,
        resources.memory,
        resources.walltime,
        logs,
        n_tasks if array else None,
        cluster.queue,
        cluster.account,
    )
    command = [cluster.python or sys.executable, "-m", "bigglm.cli", "run", str(config_path)]
    body = ["set -euo pipefail", f"cd {shlex.quote(str(Path(config_path).parent))}"]
    if array:
        if subjects_file is None:
            raise ValueError("array mode needs subjects_file")
        index = _INDEX[scheduler]
        body.append(f'subject="$(sed -n "$(({index} + 1))p" {shlex.quote(str(subjects_file))})"')
        body.append('echo "bigglm: array task for subject ${subject}"')
        command_text = shlex.join(command) + ' --subject "${subject}" --profile local'
    elif mode == "group":
        command_text = shlex.join([*command, "--level", "group"])
    else:
        command_text = shlex.join(command)
    prefix = {"slurm": "#SBATCH", "pbs": "#PBS", "sge": "#$"}[scheduler]
    extra = [f"{prefix} {d}" for d in cluster.job_extra_directives]
    return "\n".join(["#!/usr/bin/env bash", *head, *extra, *body, f"exec {command_text}", ""])


def submit(
    config_path: str | Path,
    config: AnalysisConfig,
    *,
    mode: SubmitMode | None = None,
    scheduler: str | None = None,
    dry_run: bool = False,
) -> Submission:
    """Write the job script for an analysis and submit it.

    Parameters
    ----------
    config_path : str or Path
        The YAML file (the job re-reads it).
    config : AnalysisConfig
        Its validated contents; inputs are checked (:func:`bigglm.pipeline.plan`) first.
    mode : {"driver", "array"}, optional
        Default: ``cluster.submit.mode``.
    scheduler : {"slurm", "pbs", "sge"}, optional
        Default: the cluster profile.
    dry_run : bool
        Write the script but do not submit (``job_id`` is empty).

    Returns
    -------
    Submission
        The job id the scheduler gave, the script path, and the number of array tasks.

    Raises
    ------
    ConfigError
        If the scheduler's submit command is missing or refuses the job.

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "/nope.nii.gz"}]},
    ...                     "outputs": {"folder": "/tmp/o"}, "cluster": {"profile": "slurm"}})
    >>> submit("/a.yaml", cfg, dry_run=True)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.ConfigError: inputs: /nope.nii.gz does not exist; check the path
    """
    from bigglm.io.artefacts import replace_atomically
    from bigglm.pipeline import plan, state_folder
    from bigglm.pipeline.group import plan_group
    from bigglm.security import private_folder

    kind = scheduler_of(config, scheduler)
    chosen: SubmitMode = mode or config.cluster.submit.mode
    units = plan(config)
    plan_group(config, units)  # a group section is checked before anything is submitted
    jobs = private_folder(state_folder(config.outputs.folder) / "jobs")
    private_folder(config.outputs.folder / "logs")
    subjects = sorted({u.subject for u in units})
    subjects_file = jobs / "subjects.txt"
    replace_atomically(subjects_file, "".join(f"{s}\n" for s in subjects))
    tasks = len(subjects) if chosen == "array" else 1
    text = job_script(
        Path(config_path).resolve(),
        config,
        scheduler=kind,
        mode=chosen,
        subjects_file=subjects_file,
        n_tasks=tasks,
    )
    script = jobs / f"{chosen}.{kind}.sh"
    replace_atomically(script, text).chmod(0o700)  # private, as its folder
    job_id = "" if dry_run else _submit_script(kind, script)
    group = None
    if chosen == "array" and config.group is not None:
        group = _submit_group(config_path, config, kind, jobs, job_id, dry_run)
    return Submission(job_id, script, chosen, tasks, group)


def _submit_group(
    config_path: str | Path,
    config: AnalysisConfig,
    kind: Scheduler,
    jobs: Path,
    after: str,
    dry_run: bool,
) -> Submission:
    """The group level as one job that starts once every array task succeeded."""
    from bigglm.io.artefacts import replace_atomically

    text = job_script(Path(config_path).resolve(), config, scheduler=kind, mode="group")
    script = jobs / f"group.{kind}.sh"
    replace_atomically(script, text).chmod(0o700)
    job_id = "" if dry_run else _submit_script(kind, script, dependency=_after(kind, after))
    return Submission(job_id, script, "driver", 1)


def _after(kind: Scheduler, job_id: str) -> list[str]:
    """The submit options that hold a job until ``job_id`` (an array) succeeded."""
    if kind == "slurm":
        return [f"--dependency=afterok:{job_id}"]
    if kind == "pbs":
        return ["-W", f"depend=afterokarray:{job_id}"]
    return ["-hold_jid", job_id.split(".")[0]]  # SGE: "123.1-4:1" is array job 123


def _submit_script(kind: Scheduler, script: Path, dependency: list[str] | None = None) -> str:
    command = [*_SUBMIT_COMMAND[kind], *(dependency or []), str(script)]
    if shutil.which(command[0]) is None:
        raise ConfigError(
            f"{command[0]} is not on PATH: submit from a {kind.upper()} login node, "
            f"or check scheduler=... (the script is at {script})"
        )
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=script.parent, env=os.environ
    )
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(
            f"{command[0]} refused the job ({message[-1] if message else done.returncode}); "
            f"see {script}"
        )
    match = re.search(r"[0-9][0-9A-Za-z.\[\]]*", done.stdout)
    if match is None:
        raise ConfigError(f"{command[0]} gave no job id: {done.stdout.strip()!r}")
    job_id = match.group(0).split(";")[0]
    logger.info("submitted %s as job %s", script.name, job_id)
    return job_id
