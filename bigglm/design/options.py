"""Checks of the numeric design options, shared by the Python API, the YAML config and the CLI.

Each ``check_*`` function returns the value it accepts and raises
:class:`~bigglm.exceptions.DesignError` (a ``ValueError``, so pydantic reports it as a
config error at the field's path) with what was found, what is expected and how to fix
it. The checks that need the run's length take ``n_scans``; the others run as soon as a
value is read, before any file is opened. This module imports neither NumPy nor pandas, so
reading a YAML config stays quick.

Limits (documented bounds that keep memory and time bounded whatever the input):

* :data:`MAX_TR`: a repetition time is at most 100 s (a larger value is usually in ms);
* :data:`MAX_GRID_SAMPLES`: the oversampled convolution grid, about
  ``n_scans * oversampling`` samples, holds at most 2**24 (128 MiB per float64 column).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from bigglm.exceptions import DesignError

__all__ = [
    "MAX_GRID_SAMPLES",
    "MAX_TR",
    "check_drift_order",
    "check_fir_delays",
    "check_grid_samples",
    "check_high_pass",
    "check_min_onset",
    "check_oversampling",
    "check_tr",
]

#: Longest repetition time accepted (s).
MAX_TR = 100.0
#: Most samples of the oversampled grid on which events are convolved with the HRF.
MAX_GRID_SAMPLES = 2**24


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        return math.copysign(math.inf, value)


def _finite(name: str, value: Any, unit: str = "") -> float:
    """``value`` as a finite float, or a DesignError naming the option."""
    number = _real(value)
    if number is None or not math.isfinite(number):
        raise DesignError(f"{name}={value!r} is not a finite number{unit}; give a real number")
    return number


def _integer(name: str, value: Any) -> int:
    """``value`` as an int (a float with no fraction is accepted), or a DesignError."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    number = _real(value)
    if number is None or not number.is_integer():
        raise DesignError(f"{name}={value!r} is not an integer; give a whole number")
    return int(number)


def check_tr(tr: Any) -> float:
    """A repetition time in seconds: finite, positive and at most :data:`MAX_TR`.

    Examples
    --------
    >>> check_tr(2)
    2.0
    >>> check_tr(2000.0)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: tr=2000.0 s is out of range; expected seconds in (0, 100] ...
    """
    value = _finite("tr", tr, " of seconds")
    if not 0 < value <= MAX_TR:
        raise DesignError(
            f"tr={tr!r} s is out of range; expected seconds in (0, {MAX_TR:g}] "
            "(a TR in milliseconds must be divided by 1000)"
        )
    return value


def check_high_pass(high_pass: Any, tr: float | None = None) -> float:
    """A cosine drift cut-off in Hz: finite, positive and, given ``tr``, below Nyquist.

    0 or less would silently drop the drifts; at or above ``1 / (2 tr)`` the cosines span
    every frequency and leave no degrees of freedom.

    Examples
    --------
    >>> check_high_pass(0.01, tr=2.0)
    0.01
    >>> check_high_pass(0)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: high_pass=0 Hz must be positive ...
    >>> check_high_pass(1e308, tr=2.0)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: high_pass=1e+308 Hz is at or above the Nyquist frequency ...
    """
    value = _finite("high_pass", high_pass, " of Hz")
    if value <= 0:
        raise DesignError(
            f"high_pass={high_pass!r} Hz must be positive (e.g. 0.01 for a 100 s cut-off); "
            "for no drift terms use drift None"
        )
    if tr is not None and value * tr >= 0.5:
        raise DesignError(
            f"high_pass={high_pass!r} Hz is at or above the Nyquist frequency "
            f"({0.5 / tr:g} Hz for a TR of {tr:g} s): the cosine drift would span every "
            "frequency; lower it (0.01 Hz, a 100 s cut-off, is usual)"
        )
    return value


def check_oversampling(oversampling: Any) -> int:
    """Samples per TR of the convolution grid: an integer from 1 to :data:`MAX_GRID_SAMPLES`.

    Examples
    --------
    >>> check_oversampling(50)
    50
    """
    value = _integer("oversampling", oversampling)
    if not 1 <= value <= MAX_GRID_SAMPLES:
        raise DesignError(
            f"oversampling={oversampling!r} is out of range; expected an integer from 1 to "
            f"{MAX_GRID_SAMPLES} (nilearn's default is 50)"
        )
    return value


def check_grid_samples(n_samples: float, oversampling: int) -> float:
    """The length of the oversampled grid, at most :data:`MAX_GRID_SAMPLES`.

    Examples
    --------
    >>> check_grid_samples(12001.0, 50)
    12001.0
    >>> check_grid_samples(7.2e13, 10**12)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: the convolution grid would have 7.2e+13 samples ...
    """
    if not math.isfinite(n_samples) or n_samples > MAX_GRID_SAMPLES:
        raise DesignError(
            f"the convolution grid would have {n_samples:.3g} samples (oversampling="
            f"{oversampling} per TR), more than the limit of {MAX_GRID_SAMPLES}; lower "
            "oversampling (nilearn's default is 50) or raise min_onset"
        )
    return n_samples


def check_drift_order(drift_order: Any, n_scans: int | None = None) -> int:
    """A polynomial drift order: an integer >= 1, below ``n_scans`` when it is known.

    Examples
    --------
    >>> check_drift_order(3, n_scans=100)
    3
    >>> check_drift_order(100000, n_scans=60)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: drift_order=100000 needs more than 100000 scans ...
    """
    value = _integer("drift_order", drift_order)
    if value < 1:
        raise DesignError(f"drift_order={drift_order!r} must be at least 1 (e.g. 1 or 2)")
    if n_scans is not None and value >= n_scans:
        raise DesignError(
            f"drift_order={value} needs more than {value} scans but the run has {n_scans}; "
            "use a low order (1 to 3 is usual)"
        )
    return value


def check_fir_delays(fir_delays: Any, n_scans: int | None = None) -> list[int] | None:
    """FIR delays in scans: distinct non-negative integers, below ``n_scans`` when known.

    Examples
    --------
    >>> check_fir_delays([0, 1, 2])
    [0, 1, 2]
    >>> check_fir_delays([-1, 2])
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: fir_delays: -1 is negative; delays count scans after ...
    """
    if fir_delays is None:
        return None
    if isinstance(fir_delays, str | bytes) or not isinstance(fir_delays, Sequence):
        raise DesignError(f"fir_delays={fir_delays!r} is not a list; give e.g. [0, 1, 2]")
    delays = [_integer("fir_delays", d) for d in fir_delays]
    if not delays:
        raise DesignError("fir_delays is empty; give at least one delay, e.g. [0, 1, 2]")
    for delay in delays:
        if delay < 0:
            raise DesignError(
                f"fir_delays: {delay} is negative; delays count scans after each onset (>= 0)"
            )
        if n_scans is not None and delay >= n_scans:
            raise DesignError(
                f"fir_delays: {delay} scans is not shorter than the run ({n_scans} scans)"
            )
    if len(set(delays)) != len(delays):
        raise DesignError(f"fir_delays {delays} repeat a delay; give each delay once")
    return delays


def check_min_onset(min_onset: Any) -> float:
    """The start of the convolution grid relative to the first frame (s): finite.

    Examples
    --------
    >>> check_min_onset(-24)
    -24.0
    """
    return _finite("min_onset", min_onset, " of seconds")
