"""The ``bigglm`` command line: the API's stages as sub-commands.

Only this module configures logging handlers and draws progress bars. Errors that
bigglm anticipates (bad input, bad config, missing files) are printed as one readable
line and give exit status 2; anything else keeps its traceback under ``--verbose``.

Arguments are parsed before anything heavy is imported: each sub-command imports what it
needs when it runs, so ``--help``, a usage error or a bad config answer at once instead of
after loading NumPy, pandas, Dask, xarray and Zarr (``tests/test_imports.py`` checks it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigglm.exceptions import ConfigError, DesignError, StoreError

if TYPE_CHECKING:
    from bigglm.config import ClusterConfig

__all__ = ["main"]

logger = logging.getLogger("bigglm")

#: Errors shown to the user as one line, without a traceback. ``OSError`` covers
#: StoreError and what the system refuses: a full disk, a read-only filesystem, a missing
#: file, a FIFO or device where a file was expected.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DesignError, OSError)


#: The library's words for an option, per sub-command, and the flag that gives it there.
#: Names (no ``=``) are translated where a message starts with them (``contrasts 'a': ...``),
#: options with a value (``overwrite=True``) wherever they stand.
_FLAGS: dict[str, dict[str, str]] = {
    "convert": {"overwrite=True": "--overwrite"},
    "run": {"overwrite=True": "--overwrite", "subjects": "--subject"},
    "validate": {"subjects": "--subject"},
    "submit": {"scheduler=...": "--scheduler"},
    "fit": {
        "overwrite=True": "--overwrite",
        "contrasts": "--contrast",
        "events": "--events",
        "confounds": "--confounds",
        "residuals": "--residuals",
    },
}


def _one_line(err: BaseException, command: str = "") -> str:
    """The message of a user error in the command's words (its flags for the library's
    options); an ``OSError`` from the system as ``path: reason``."""
    if isinstance(err, OSError) and not isinstance(err, StoreError) and err.strerror:
        import errno

        where = f"{err.filename}: " if err.filename is not None else ""
        code = errno.errorcode.get(err.errno or 0)
        return f"{where}{err.strerror}" + (f" ({code})" if code else "")
    return _in_flags(" ".join(str(err).split()) or type(err).__name__, command)


def _in_flags(message: str, command: str) -> str:
    """``message`` with the library's option names replaced by ``command``'s flags.

    Examples
    --------
    >>> _in_flags("x.zarr: already exists; pass overwrite=True to replace it", "convert")
    'x.zarr: already exists; pass --overwrite to replace it'
    >>> _in_flags("contrasts 'a': write NAME=EXPRESSION", "fit")
    "--contrast 'a': write NAME=EXPRESSION"
    """
    for words, flag in _FLAGS.get(command, {}).items():
        if "=" in words:
            message = message.replace(words, flag)
        elif message.startswith(words) and message[len(words) : len(words) + 1] in " :=":
            message = flag + message[len(words) :]
    return message


@contextmanager
def _logging_to_stderr(verbosity: int) -> Iterator[None]:
    """Send the ``bigglm`` logger to stderr while the command runs, then restore it.

    Only the CLI attaches a handler, and only for the duration of :func:`main`, so calling
    ``main()`` from Python (or a test) leaves no handler behind on a stream that may close.
    """
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    closing = _ClosedClientNoise()
    noisy = [logging.getLogger(name) for name in ("asyncio", "tornado.application")]
    for other in noisy:
        other.addFilter(closing)
    try:
        yield
    finally:
        logger.handlers[:], _, logger.propagate = saved
        logger.setLevel(saved[1])
        for other in noisy:
            other.removeFilter(closing)


class _ClosedClientNoise(logging.Filter):
    """Drop the tracebacks a closing Dask client leaves (after Ctrl-C, or an error that
    stops the run), about nothing the user can act on: asyncio's "Task exception was never
    retrieved" for the gathers it ends with ``AllExit``, and tornado's "Exception in
    callback" for the futures ``as_completed`` was still tracking when the connection
    closed (``CommClosedError``, seen with Python 3.13)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        name = type(error).__name__
        if name == "AllExit":
            return False
        closed = name in ("CommClosedError", "StreamClosedError")
        return not (closed and "_track_future" in record.getMessage())


@contextmanager
def progress_bar(description: str, *, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """Yield a ``(done, total)`` callback drawing a bar on a terminal, log lines otherwise."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc=description, unit="step", file=sys.stderr, leave=False)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            yield update
        finally:
            bar.close()
        return

    last = [-1]

    def log(done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        if enabled and pct // 10 != last[0] // 10:
            last[0] = pct
            logger.info("%s: %d/%d (%d%%)", description, done, total, pct)

    yield log


def _build_parser() -> argparse.ArgumentParser:
    from bigglm import __version__

    parser = argparse.ArgumentParser(
        prog="bigglm",
        description="Out-of-core fMRI GLMs: NIfTI -> Zarr -> Dask -> statistical maps.",
    )
    _add_global_options(parser, version=__version__, default=0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _COMMANDS:
        register(sub)
    for command in sub.choices.values():  # also after the sub-command; SUPPRESS keeps
        _add_global_options(command, version=__version__, default=argparse.SUPPRESS)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, version: str, default: Any) -> None:
    """The options of every command, accepted before the sub-command and after it:
    ``--version`` and ``-q``/``-v``. With ``default=argparse.SUPPRESS`` (on a sub-command)
    a ``-q``/``-v`` given before the sub-command is kept unless one is given after it, and
    then the one after it counts."""
    options = parser.add_argument_group("global options (before or after the command)")
    options.add_argument(
        "--version", action="version", version=f"bigglm {version}", help="print the version"
    )
    noise = options.add_mutually_exclusive_group()
    noise.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        default=default,
        help="only warnings and errors",
    )
    noise.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=1,
        dest="verbosity",
        default=default,
        help="debug logging, and tracebacks on errors",
    )


SubParsers = argparse._SubParsersAction


# --- workflows: run, validate, submit, demo, fit (issue 5) ----------------------------------


def _progress_factory(args: argparse.Namespace) -> Callable[[str], Any]:
    """``progress(description)`` for the pipeline: a bar on a terminal, log lines otherwise."""
    enabled = args.verbosity >= 0
    return lambda description: progress_bar(description, enabled=enabled)


def _load(args: argparse.Namespace) -> Any:
    from bigglm.config import load_config

    config = load_config(args.config)
    if getattr(args, "profile", None):
        from bigglm.config import ClusterConfig

        config = config.model_copy(update={"cluster": ClusterConfig(profile=args.profile)})
    return config


def _add_subject_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--subject",
        action="append",
        metavar="LABEL",
        help="only this subject (repeatable); the array jobs of 'submit' use it",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)  # before the pipeline's imports: a bad config fails in a blink
    from bigglm.pipeline import run_analysis
    from bigglm.report import format_summary

    outcomes = run_analysis(
        config,
        subjects=args.subject,
        progress=_progress_factory(args),
        overwrite=args.overwrite,
        level=args.level,
    )
    print(format_summary(outcomes))
    return 0


def _add_run(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "run",
        help="run an analysis from a YAML config: first level, then group (resumes)",
        description="Validate, convert, build designs, fit, write contrast maps, provenance "
        "and a summary. Finished steps are skipped when the command is run again.",
    )
    parser.add_argument("config", type=Path, help="the analysis YAML")
    _add_subject_option(parser)
    parser.add_argument(
        "--level",
        choices=["all", "first", "group"],
        default="all",
        help="run the first level, the group level (from the first level's maps), or both "
        "(default)",
    )
    parser.add_argument(
        "--profile",
        choices=["local"],
        help="override the config's cluster profile (array tasks compute locally)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of another analysis in outputs.folder (a rerun of the "
        "same config resumes without it; files bigglm did not write are never replaced)",
    )
    parser.set_defaults(func=_cmd_run)


def _cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args)  # before the pipeline's imports: a bad config fails in a blink
    from bigglm.pipeline.group import plan_group
    from bigglm.pipeline.plan import plan  # the function: doctest collection binds the module

    units = plan(config, args.subject)
    group = plan_group(config, units) if args.subject is None else None
    runs = sum(len(u.runs) for u in units)
    for unit in units:
        for rp in unit.runs:
            columns = len(rp.design.columns)
            print(
                f"{unit.name}: {rp.run.name}: {rp.n_scans} volumes, TR {rp.tr:g} s, "
                f"{columns} regressors"
            )
    if group is not None:
        names = ", ".join(str(c) for c in group.design.columns)
        where = group.participants or "no participants table: intercept only"
        print(
            f"group: {len(group.subjects)} subjects ({where}), design columns {names}, "
            f"model {config.group.model}, contrasts: {', '.join(config.group.contrasts)}; "
            f"takes up: {', '.join(config.group_inputs)}"
        )
    contrasts = ", ".join(config.contrasts) or "none"
    print(
        f"{args.config}: valid: {len(units)} units, {runs} runs, contrasts: {contrasts}; "
        f"cluster: {config.cluster.profile} ({_transport(config.cluster)})"
    )
    return 0


def _transport(cluster: ClusterConfig) -> str:
    """How bigglm's Dask traffic will travel, in words for ``validate``."""
    if cluster.profile == "address":
        return "TLS" if (cluster.address or "").startswith("tls://") else "no TLS"
    return "TLS, per-run credentials" if cluster.security.tls else "no TLS: security.tls is false"


def _add_validate(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "validate",
        help="check a YAML config and its inputs in seconds, before any long work",
        description="Check the config, that input files exist, that TRs and lengths agree, "
        "that designs build and that contrasts name real columns. Reads no voxel data.",
    )
    parser.add_argument("config", type=Path, help="the analysis YAML")
    _add_subject_option(parser)
    parser.set_defaults(func=_cmd_validate)


def _cmd_submit(args: argparse.Namespace) -> int:
    from bigglm.batch import submit

    config = _load(args)
    done = submit(
        args.config, config, mode=args.mode, scheduler=args.scheduler, dry_run=args.dry_run
    )
    what = f"{done.tasks} array tasks" if done.mode == "array" else "1 driver job"
    if args.dry_run:
        print(f"wrote {done.script} ({what}); not submitted")
    else:
        print(f"submitted job {done.job_id} ({what}); script {done.script}")
    if done.group is not None and args.dry_run:
        print(f"wrote {done.group.script} (the group level, after the array); not submitted")
    elif done.group is not None:
        print(
            f"submitted job {done.group.job_id} (the group level, after job {done.job_id} "
            f"succeeds); script {done.group.script}"
        )
    return 0


def _add_submit(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "submit",
        help="submit an analysis to SLURM, PBS or SGE; prints the job id",
        description="Either one driver job running 'bigglm run' (its Dask workers are "
        "batch jobs when the cluster profile is a batch system), or one array task per "
        "subject.",
    )
    parser.add_argument("config", type=Path, help="the analysis YAML")
    parser.add_argument(
        "--mode", choices=["driver", "array"], help="default: cluster.submit.mode (driver)"
    )
    parser.add_argument(
        "--scheduler", choices=["slurm", "pbs", "sge"], help="default: cluster.profile"
    )
    parser.add_argument("--dry-run", action="store_true", help="write the script only")
    parser.set_defaults(func=_cmd_submit)


def _cmd_demo(args: argparse.Namespace) -> int:
    from bigglm.demo import format_report, run_demo
    from bigglm.report import format_summary

    report = run_demo(
        args.output,
        n_scans=args.scans,
        n_subjects=args.subjects,
        seed=args.seed,
        progress=_progress_factory(args),
    )
    print(format_summary(report.outcomes))
    print(format_report(report))
    return 0


def _add_demo(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "demo",
        help="a synthetic study with known activations: run it, score the recovery",
        description="Writes a BIDS-derivatives study (12 subjects on a 4 mm MNI brain mask, "
        "AR(1) noise, faces and houses blocks, subject-varying effects and noise), runs the "
        "first and group levels, and prints how well the true effects were recovered and "
        "whether family-wise error control held where there is no effect.",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("bigglm-demo"), help="working folder (bigglm-demo)"
    )
    parser.add_argument("--scans", type=int, default=160, help="volumes per run (160)")
    parser.add_argument(
        "--subjects", type=int, default=12, help="subjects (12); 1: the first level only"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.set_defaults(func=_cmd_demo)


def _cmd_fit(args: argparse.Namespace) -> int:
    from bigglm.pipeline import fit_stores

    written = fit_stores(
        args.stores,
        args.output,
        events=args.events,
        confounds=args.confounds,
        confound_columns=args.confound_columns,
        contrasts=args.contrast,
        noise=args.noise,
        hrf=args.hrf,
        drift=args.drift,
        high_pass=args.high_pass,
        slice_time_ref=args.slice_time_ref,
        address=args.address,
        tls=_tls_options(args),
        residuals=args.residuals,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(written)} images to {args.output}")
    return 0


def _tls_options(args: argparse.Namespace) -> dict[str, str]:
    given = {"ca_file": args.tls_ca_file, "cert": args.tls_cert, "key": args.tls_key}
    return {name: value for name, value in given.items() if value is not None}


def _add_fit(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "fit",
        help="fit converted stores with events/confounds files and contrasts (no YAML)",
        description="Fit one subject's runs (stores from 'bigglm convert') and write a map "
        "per contrast and statistic.",
    )
    parser.add_argument("stores", nargs="+", type=Path, help="the runs' stores (*.zarr)")
    parser.add_argument("--events", nargs="+", type=Path, help="events.tsv per store")
    parser.add_argument("--confounds", nargs="+", type=Path, help="confounds TSV per store")
    parser.add_argument(
        "--confound-columns", nargs="+", metavar="PATTERN", help="columns to keep (globs)"
    )
    parser.add_argument(
        "--contrast",
        action="append",
        default=[],
        metavar="NAME=EXPR",
        help="e.g. faces_minus_houses='faces - houses' (repeatable; rows split by ';' make F)",
    )
    parser.add_argument("--noise", default="ar1", help="ols or arN (default ar1)")
    parser.add_argument("--hrf", default="glover", help="HRF model (default glover)")
    parser.add_argument("--drift", default="cosine", help="cosine, polynomial or none")
    parser.add_argument("--high-pass", type=float, default=0.01, help="Hz (default 0.01)")
    parser.add_argument("--slice-time-ref", type=float, default=0.0, help="0..1 (default 0)")
    parser.add_argument("--address", help="a Dask scheduler address (default: local cluster)")
    for option, what in (
        ("ca-file", "the certificate authority"),
        ("cert", "the client's certificate"),
        ("key", "the client's private key"),
    ):
        parser.add_argument(
            f"--tls-{option}", metavar="PEM", help=f"for a tls:// --address: {what} (PEM file)"
        )
    parser.add_argument(
        "--residuals",
        choices=["raw", "whitened"],
        help="also write each run's residuals (Y - X beta, or AR-whitened): a second pass",
    )
    parser.add_argument("--output", type=Path, required=True, help="folder for the maps")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs an earlier 'bigglm fit' wrote there (never files bigglm did not)",
    )
    parser.set_defaults(func=_cmd_fit)


# --- ingest: convert (issue 2) ---------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    from bigglm.io import convert

    with progress_bar(f"convert {args.store.name}", enabled=args.verbosity >= 0) as progress:
        path = convert(
            args.sources,
            args.store,
            mask=args.mask,
            tr=args.tr,
            overwrite=args.overwrite,
            time_chunk=args.time_chunk,
            voxel_chunk=args.voxel_chunk,
            progress=progress,
        )
    print(path)
    return 0


def _add_convert(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert a NIfTI run (4D file or 3D volumes) to a bigglm Zarr store",
        description="Convert one run to a chunked Zarr store: a 4D .nii/.nii.gz, or its 3D "
        "volumes in time order. Prints the store's path.",
    )
    parser.add_argument("sources", nargs="+", type=Path, metavar="SOURCE", help="NIfTI file(s)")
    parser.add_argument("--store", type=Path, required=True, help="store to create (*.zarr)")
    parser.add_argument("--mask", type=Path, help="mask NIfTI on the same grid (default: EPI mask)")
    parser.add_argument("--tr", type=float, help="repetition time in s (default: from header)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument(
        "--time-chunk", type=int, metavar="N", help="volumes per chunk (default 128)"
    )
    parser.add_argument(
        "--voxel-chunk", type=int, metavar="N", help="voxels per chunk (default: ~16 MiB)"
    )
    parser.set_defaults(func=_cmd_convert)


#: Each entry adds one sub-command to the parser; the sub-parser's ``func`` default runs it.
#: Sub-command builders are defined below and listed here in the order ``--help`` shows them.
_COMMANDS: tuple[Callable[[SubParsers], None], ...] = (
    _add_convert,
    _add_run,
    _add_validate,
    _add_submit,
    _add_demo,
    _add_fit,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    with _logging_to_stderr(args.verbosity), _termination_unwinds():
        try:
            return int(args.func(args) or 0)
        except USER_ERRORS as err:
            if args.verbosity > 0:
                logger.exception("failed")
            print(f"bigglm {args.command}: error: {_one_line(err, args.command)}", file=sys.stderr)
            return 2
        except _Terminated:
            _quiet_shutdown()
            print(f"bigglm {args.command}: terminated (SIGTERM)", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            _quiet_shutdown()
            print(f"bigglm {args.command}: interrupted", file=sys.stderr)
            return 130


class _Terminated(KeyboardInterrupt):
    """SIGTERM, as an interrupt: what ``scancel``, ``qdel`` and a job's walltime send."""


@contextmanager
def _termination_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` while a command runs, so that it unwinds as
    Ctrl-C does: the cluster bigglm started is closed (its batch jobs cancelled), the
    run's TLS credentials removed, and the locks released, instead of the process dying
    with all of them left behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_shutdown() -> None:
    """After Ctrl-C, keep the shutdown's noise off stderr: the cluster's closing messages
    and the warnings about the coroutines the interrupt left unfinished."""
    import warnings

    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
