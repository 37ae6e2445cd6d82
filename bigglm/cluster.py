"""Dask clusters from a profile: local, an existing scheduler, or SLURM/PBS/SGE jobs.

:func:`client_from_profile` is a context manager that starts (or connects to) the cluster
a :class:`~bigglm.config.ClusterConfig` describes and closes what it started on exit:

- ``local``: a :class:`distributed.LocalCluster` sized to the machine (the default);
- ``address``: an already running scheduler;
- ``slurm``, ``pbs``, ``sge``: worker processes that are batch jobs, through
  dask-jobqueue. Workers get ``--lifetime`` below the walltime (with a stagger, so they do
  not all leave at once) and restart, so a long fit outlives any single job.

The worker processes of the clusters it starts (not of an ``address`` scheduler) begin with
the glibc malloc thresholds of :mod:`bigglm.worker_memory` and run its pressure valve,
unless the profile's ``tune_malloc`` is false.

Every cluster it starts uses TLS with mutual authentication and credentials made for the
run (:mod:`bigglm.security`); a local cluster listens on loopback only, and every
dashboard on 127.0.0.1 unless the profile's ``dashboard_address`` says otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bigglm.config import ClusterConfig, walltime_seconds
from bigglm.exceptions import ConfigError

__all__ = ["client_from_profile", "jobqueue_options", "lifetime_options", "local_options"]

logger = logging.getLogger(__name__)

#: How long to wait for the first worker of a batch cluster before giving up.
WORKER_TIMEOUT = 600.0
#: The command each batch system submits jobs with.
_SUBMIT = {"slurm": "sbatch", "pbs": "qsub", "sge": "qsub"}
#: How long to try to reach an ``address`` scheduler.
CONNECT_TIMEOUT = "30s"


def lifetime_options(walltime: str) -> list[str]:
    """Worker arguments that retire a batch worker before its job's walltime.

    The margin is a tenth of the walltime (at least one minute, at most 15 minutes);
    workers retire after ``walltime - margin``, staggered by half the margin so they do not
    all leave together, and restart in a new job.

    Parameters
    ----------
    walltime : str
        The job walltime, ``[D-]HH:MM:SS``.

    Returns
    -------
    list of str
        ``["--lifetime", "...s", "--lifetime-stagger", "...s", "--lifetime-restart"]``.

    Examples
    --------
    >>> lifetime_options("01:00:00")
    ['--lifetime', '3240s', '--lifetime-stagger', '180s', '--lifetime-restart']
    """
    total = walltime_seconds(walltime)
    margin = min(max(total // 10, 60), 900)
    if margin * 2 >= total:
        raise ConfigError(
            f"cluster.walltime {walltime!r} is too short for a worker to do useful work; "
            "give at least '00:05:00'"
        )
    stagger = margin // 2
    return [
        "--lifetime",
        f"{total - margin}s",
        "--lifetime-stagger",
        f"{stagger}s",
        "--lifetime-restart",
    ]


def local_options(profile: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments for :class:`distributed.LocalCluster` from a ``local`` profile.

    Without explicit sizes, one single-threaded worker process per available core (the
    fit is numpy-heavy and releases the GIL, but processes keep memory accounting simple).

    Parameters
    ----------
    profile : ClusterConfig
        A profile with ``profile: local``.

    Returns
    -------
    dict
        ``n_workers``, ``threads_per_worker``, ``memory_limit``, ``processes``, ``host``
        (loopback) and ``dashboard_address`` (default ``"127.0.0.1:0"``: loopback, any
        free port).

    Examples
    --------
    >>> from bigglm.config import ClusterConfig
    >>> local_options(ClusterConfig(n_workers=2, threads_per_worker=1))["n_workers"]
    2
    """
    cores = _available_cores()
    threads = profile.threads_per_worker or 1
    workers = profile.n_workers or max(1, cores // threads)
    return {
        "n_workers": workers,
        "threads_per_worker": threads,
        "memory_limit": profile.memory_limit or "auto",
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": profile.dashboard_address,
    }


def jobqueue_options(profile: ClusterConfig, security: Any = None) -> dict[str, Any]:
    """Keyword arguments for a dask-jobqueue cluster class from a batch profile.

    Parameters
    ----------
    profile : ClusterConfig
        A profile with ``profile`` ``slurm``, ``pbs`` or ``sge``.
    security : distributed.Security, optional
        File-based credentials (:func:`bigglm.security.batch_security`): the scheduler
        and the workers then speak ``tls://``, and the job script names the files.

    Returns
    -------
    dict
        cores, processes, memory, walltime, queue, account, job_extra_directives,
        worker_extra_args (with ``--lifetime``), python, the optional folders and, with
        ``tune_malloc``, a ``job_script_prologue`` that exports the malloc thresholds
        (after the lines dask-jobqueue's own configuration gives).

    Examples
    --------
    >>> from bigglm.config import ClusterConfig
    >>> opts = jobqueue_options(ClusterConfig(profile="slurm", walltime="02:00:00"))
    >>> opts["walltime"], opts["worker_extra_args"][:2]
    ('02:00:00', ['--lifetime', '6480s'])
    """
    options: dict[str, Any] = {
        "cores": profile.cores,
        "processes": profile.processes,
        "memory": profile.memory,
        "walltime": profile.walltime,
        "job_extra_directives": list(profile.job_extra_directives),
        "worker_extra_args": lifetime_options(profile.walltime),
        "python": profile.python or sys.executable,
        # No fixed dashboard port: several clusters may share a login node.
        "scheduler_options": {"dashboard_address": profile.dashboard_address},
    }
    if security is not None:
        options.update(security=security, protocol="tls://")
    if profile.profile == "sge":
        # SGE has no walltime keyword of its own in dask-jobqueue's template; it is h_rt.
        options["resource_spec"] = f"h_rt={profile.walltime}"
    optional = {
        "queue": profile.queue,
        "account": profile.account if profile.profile != "sge" else None,
        "project": profile.account if profile.profile == "sge" else None,
        "local_directory": profile.local_directory,
        "log_directory": profile.log_directory,
        "interface": profile.interface,
    }
    options.update({key: value for key, value in optional.items() if value is not None})
    exports = _job_script_exports(profile)
    if exports:
        options["job_script_prologue"] = _configured_prologue(profile.profile) + exports
    return options


def _malloc_environ(profile: ClusterConfig) -> dict[str, str]:
    """The malloc variables for the worker processes of ``profile`` (none if opted out)."""
    from bigglm.worker_memory import worker_environ

    return worker_environ() if profile.tune_malloc else {}


def _job_script_exports(profile: ClusterConfig) -> list[str]:
    from bigglm.worker_memory import job_script_exports

    return job_script_exports(_malloc_environ(profile))


def _configured_prologue(kind: str) -> list[str]:
    """The job-script prologue dask-jobqueue's configuration gives (its old name included),
    which an explicit ``job_script_prologue`` would replace."""
    import dask

    for key in ("job-script-prologue", "env-extra"):
        lines = dask.config.get(f"jobqueue.{kind}.{key}", default=None)
        if lines:
            return list(lines)
    return []


@contextmanager
def client_from_profile(
    profile: ClusterConfig | None = None,
    *,
    tune_malloc: bool | None = None,
    credentials: str | os.PathLike[str] | None = None,
) -> Iterator[Any]:
    """Start or join the Dask cluster a profile describes; yield a connected client.

    Parameters
    ----------
    profile : ClusterConfig, optional
        The ``cluster`` section of a configuration; ``None`` means ``local``.
    tune_malloc : bool, optional
        Overrides the profile's ``tune_malloc``: whether the worker processes of a
        cluster started here run with bigglm's malloc thresholds and pressure valve
        (:mod:`bigglm.worker_memory`). A scheduler joined by ``address`` is never changed.
    credentials : path, optional
        For a batch cluster: the folder on the shared filesystem under which this run's
        TLS credentials are written (and removed at exit). Default: the profile's
        ``security.directory``, else ``~/.bigglm/credentials``.

    Yields
    ------
    distributed.Client
        A client with at least one worker. The cluster is closed on exit if this
        function started it; an ``address`` scheduler is left running.

    Raises
    ------
    ConfigError
        If the scheduler cannot be reached or no batch worker starts in time.

    Examples
    --------
    >>> from bigglm.config import ClusterConfig
    >>> with client_from_profile(ClusterConfig(n_workers=1)) as client:
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    from distributed import Client

    profile = profile or ClusterConfig()
    if tune_malloc is not None:
        profile = profile.model_copy(update={"tune_malloc": tune_malloc})
    if profile.profile == "address":
        with _connect(profile) as client:
            yield client
        return
    tuned = bool(_malloc_environ(profile))
    with (
        _distributed_level_restored(),
        _start_cluster(profile, _credentials_parent(profile, credentials)) as cluster,
        Client(cluster, security=cluster.security) as client,
    ):
        if profile.profile != "local":
            _wait_for_batch_workers(client, profile)
        client.register_plugin(_quiet_bigglm_errors())
        if tuned:
            from bigglm.worker_memory import MallocValve

            client.register_plugin(MallocValve())
        logger.info("dask cluster (%s): %s", profile.profile, _describe(client))
        try:
            yield client
        except BaseException:  # Ctrl-C or an error: the close's cancellations are noise
            _quiet_close(client)
            raise


@contextmanager
def _distributed_level_restored() -> Iterator[None]:
    """Give ``distributed``'s logger its level back once a cluster bigglm started is
    closed (:func:`_quiet_close` silences it for the close only)."""
    log = logging.getLogger("distributed")
    level = log.level
    try:
        yield
    finally:
        log.setLevel(level)


def _credentials_parent(profile: ClusterConfig, given: str | os.PathLike[str] | None) -> Path:
    from bigglm.security import DEFAULT_CREDENTIALS

    chosen = profile.security.directory or given or DEFAULT_CREDENTIALS
    return Path(chosen).expanduser()


@contextmanager
def _connect(profile: ClusterConfig) -> Iterator[Any]:
    from distributed import Client

    from bigglm.security import address_security

    address, given = profile.address or "", profile.security
    security = address_security(address, ca_file=given.ca_file, cert=given.cert, key=given.key)
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, security=security)
    except (OSError, TimeoutError) as err:
        raise ConfigError(
            f"cluster.address: cannot reach a Dask scheduler at {address!r} ({err}); "
            "start one (dask scheduler) or fix the address"
        ) from None
    with client:
        logger.info("dask cluster (address): %s", _describe(client))
        yield client


@contextmanager
def _start_cluster(profile: ClusterConfig, credentials: Path) -> Iterator[Any]:
    from bigglm.security import batch_security, local_security

    tls = profile.security.tls
    if not tls:
        logger.warning(
            "cluster.security.tls is false: the %s cluster's scheduler accepts any client "
            "that reaches its port",
            profile.profile,
        )
    if profile.profile == "local":
        from distributed import LocalCluster

        from bigglm.worker_memory import spawn_environ

        # the worker processes inherit SIGINT blocked, and start with the malloc thresholds
        with _interrupts_held(), spawn_environ(_malloc_environ(profile)):
            cluster = LocalCluster(**local_options(profile), security=local_security(tls))
        with cluster:
            yield cluster
        return
    command = _SUBMIT[profile.profile]
    if shutil.which(command) is None:
        raise ConfigError(
            f"cluster.profile {profile.profile!r}: {command} is not on PATH, so no worker job "
            "can be submitted; run on a login node of that cluster, or use profile 'local'"
        )
    cls = _jobqueue_class(profile.profile)
    logs = Path(profile.log_directory).expanduser() if profile.log_directory else None
    if logs is not None and not logs.exists():  # a folder of yours keeps its mode
        from bigglm.security import private_folder

        private_folder(logs)
    with (
        batch_security(tls, credentials) as security,
        cls(**jobqueue_options(profile, security)) as cluster,
    ):
        logger.debug("batch job script:\n%s", cluster.job_script())
        cluster.scale(jobs=profile.jobs)
        yield cluster


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ignore SIGINT while a LocalCluster spawns its worker processes, then restore it.

    Ctrl-C in a terminal signals the whole process group. A worker process that starts
    with SIGINT ignored keeps ignoring it (Python installs its handler, and asyncio its
    runner's, only over the default), so only this process sees the interrupt and closes
    the cluster, instead of every worker printing a ``KeyboardInterrupt`` traceback and a
    half-started cluster failing with an ``AssertionError``. A Ctrl-C in the seconds the
    workers take to start is ignored; press it again once they are up.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a caller's thread keeps its own
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _quiet_close(client: Any) -> None:
    """Before an interrupted cluster closes: silence distributed's loggers, here and on
    the workers (which would warn about every task the close cancels)."""
    _silence_distributed()
    try:
        client.run(_silence_distributed)
    except Exception:  # a worker already gone: nothing left to silence
        logger.debug("could not silence the workers' loggers", exc_info=True)


def _silence_distributed() -> None:
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


#: Exceptions whose "Compute Failed" log on a worker repeats what the client raises.
_OWN_ERRORS = ("StoreDamaged(", "StoreError(", "DesignError(", "ConfigError(")


class _OwnErrorsFilter(logging.Filter):
    """Drop a worker's "Compute Failed" record for a task that raised a bigglm error: the
    client raises that error with its message, which the CLI prints as one line; the
    worker's record would add the task's key and a traceback around it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Compute Failed") and any(e in message for e in _OWN_ERRORS))


def _quiet_bigglm_errors() -> Any:
    """A worker plugin installing :class:`_OwnErrorsFilter` on ``distributed.worker``,
    for the clusters bigglm starts (never a user's cluster joined by address)."""
    from distributed import WorkerPlugin

    class QuietBigGLMErrors(WorkerPlugin):
        name = "bigglm-quiet-own-errors"

        def setup(self, worker: Any) -> None:
            logging.getLogger("distributed.worker").addFilter(_OwnErrorsFilter())

    return QuietBigGLMErrors()


def _jobqueue_class(kind: str) -> Any:
    import dask_jobqueue as jobqueue

    return {"slurm": jobqueue.SLURMCluster, "pbs": jobqueue.PBSCluster, "sge": jobqueue.SGECluster}[
        kind
    ]


def _wait_for_batch_workers(client: Any, profile: ClusterConfig) -> None:
    try:
        client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
    except TimeoutError:
        raise ConfigError(
            f"no {profile.profile} worker job started within {WORKER_TIMEOUT:.0f} s; check the "
            f"queue (squeue/qstat), and cluster.queue, cluster.account and cluster.memory"
        ) from None


def _describe(client: Any) -> str:
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    link = client.dashboard_link
    scheduler = client.scheduler.address
    hint = _tunnel_hint(link)
    return f"{scheduler}, {len(workers)} workers, {threads} threads, dashboard {link}{hint}"


def _tunnel_hint(link: str) -> str:
    """How to open a loopback dashboard from another machine (an ssh tunnel)."""
    from urllib.parse import urlsplit

    parts = urlsplit(link)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
        return ""
    host = socket.gethostname()
    return f" (from your own machine: ssh -L {parts.port}:localhost:{parts.port} {host})"


def _available_cores() -> int:
    """Cores this process may use: a batch allocation's count, else the CPU affinity."""
    for variable in ("SLURM_CPUS_PER_TASK", "NCPUS", "NSLOTS"):  # SLURM, PBS, SGE
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
