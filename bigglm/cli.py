"""The ``bigglm`` command line: the API's stages as sub-commands.

Only this module configures logging handlers and draws progress bars. Errors that
bigglm anticipates (bad input, bad config, missing files) are printed as one readable
line and give exit status 2; anything else keeps its traceback under ``--verbose``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bigglm.exceptions import ConfigError, DesignError, StoreError

__all__ = ["main"]

logger = logging.getLogger("bigglm")

#: Errors shown to the user as one line, without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DesignError,
    StoreError,
    FileNotFoundError,
    PermissionError,
)


def _configure_logging(verbosity: int) -> None:
    """Attach one stderr handler to the ``bigglm`` logger (CLI only)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


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
    parser.add_argument("--version", action="version", version=f"bigglm {__version__}")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        default=0,
        help="only warnings and errors",
    )
    noise.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=1,
        dest="verbosity",
        help="debug logging, and tracebacks on errors",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _COMMANDS:
        register(sub)
    return parser


SubParsers = argparse._SubParsersAction

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
    parser.add_argument("--time-chunk", type=int, help="volumes per chunk (default 128)")
    parser.add_argument("--voxel-chunk", type=int, help="voxels per chunk (default: ~16 MiB)")
    parser.set_defaults(func=_cmd_convert)


#: Each entry adds one sub-command to the parser; the sub-parser's ``func`` default runs it.
#: Sub-command builders are defined below and listed here in the order ``--help`` shows them.
_COMMANDS: tuple[Callable[[SubParsers], None], ...] = (_add_convert,)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbosity)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.verbosity > 0:
            logger.exception("failed")
        print(f"bigglm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bigglm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
