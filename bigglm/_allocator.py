"""glibc ``malloc`` settings for Dask worker processes, applied once per process.

``distributed`` starts its worker processes with ``MALLOC_TRIM_THRESHOLD_=65536`` so that
freed memory goes back to the operating system promptly. Setting any of glibc's malloc
thresholds also turns off its adaptive mmap threshold, which otherwise rises to 32 MiB in
a process that frees large blocks. The worker then serves every buffer larger than
128 KiB (each chunk read from a store, each float64 copy of it, each block of sufficient
statistics) with a fresh ``mmap`` that the kernel zero-fills page by page and unmaps on
``free``: for 16 MB chunks that costs as much as the arithmetic. Measured on this
project's benchmark (8 runs, 2 single-threaded workers with 512 MiB each, OLS): 8.2 s
under distributed's setting, 5.5 s with both thresholds at 32 MiB, for peak worker memory
0.22 -> 0.33 GiB (a lower trim threshold gave back less time: 8 MiB 7.3 s, 16 MiB 6.4 s).

:func:`tune` sets both thresholds to 32 MiB, glibc's own adaptive ceiling, when the
process's environment sets the trim threshold without an mmap threshold (distributed's
default, or a user's ``MALLOC_TRIM_THRESHOLD_``); a ``MALLOC_MMAP_THRESHOLD_`` in the
environment is left as the user chose it, and so is any process without glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["THRESHOLD", "tune"]

logger = logging.getLogger(__name__)

#: Bytes: blocks below this come from malloc's arenas; free space above this at the top
#: of an arena is returned to the system.
THRESHOLD = 32 * 2**20

#: glibc's ``mallopt`` parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Whether :func:`tune` set the thresholds in this process (None: not asked yet).
_applied: bool | None = None


def tune() -> bool:
    """Apply the thresholds in this process if it needs them; cheap after the first call.

    Returns
    -------
    bool
        Whether this process runs with the thresholds set here.

    Examples
    --------
    >>> isinstance(tune(), bool)
    True
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, THRESHOLD) == 1
    logger.debug("malloc mmap and trim thresholds at %d bytes: %s", THRESHOLD, done)
    return done
