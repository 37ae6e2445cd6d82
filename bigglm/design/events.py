"""Events tables (BIDS ``events.tsv`` or a DataFrame) and their convolved regressors.

Each condition (``trial_type``) becomes a boxcar on an oversampled grid, is convolved
with every kernel of the HRF model, and is sampled at the frame times by linear
interpolation, exactly as nilearn's ``make_first_level_design_matrix`` does.

As in nilearn, an event of zero duration lasts one step of the oversampled grid, so its
regressor's amplitude is proportional to ``tr / oversampling`` (halving the oversampling
doubles it, and halves the beta); give such events a real duration (e.g. the stimulus
duration) to make betas independent of the grid.

Where bigglm differs from nilearn 0.14.1 (documented and tested):

* events that start before ``frame_times[0] + min_onset`` are dropped, as nilearn's
  documentation says; nilearn warns that they are "not considered" but in fact moves
  them to the start of its grid, where they still shape the regressor;
* ``trial_type`` values become strings (column names are always ``str``);
* events that start after the last frame time are reported with a ``BigGLMWarning``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from bigglm.design._warnings import warn_caller
from bigglm.design.hemodynamic import KernelFunction, convolve_regressor, hrf_basis
from bigglm.design.options import check_grid_samples
from bigglm.design.orthogonal import orthogonalize_in_order
from bigglm.exceptions import DesignError, not_a_regular_file

__all__ = ["condition_regressors", "oversampled_grid", "read_events"]

logger = logging.getLogger(__name__)

_REQUIRED = ("onset", "duration")
HRFModel = str | KernelFunction | Sequence[KernelFunction] | None


def read_table(source: str | Path | pd.DataFrame, kind: str) -> tuple[pd.DataFrame, str]:
    """A BIDS table (TSV, or CSV by suffix; ``n/a`` is missing) and a label for messages.

    ``kind`` ("events", "confounds") names the table in errors and in the label of a
    DataFrame given directly.
    """
    if isinstance(source, pd.DataFrame):
        return source.copy(), f"{kind} table"
    path = Path(source)
    problem = not_a_regular_file(path)
    if problem:
        raise DesignError(f"{kind} file {path} {problem}; check the path")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        table = pd.read_csv(path, sep=sep, na_values=["n/a"], keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise DesignError(
            f"{kind} file {path} is empty; expected a header row (e.g. 'onset', 'duration', "
            "'trial_type' for events) and one row per entry"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DesignError(f"cannot read {kind} file {path}: {err}") from err
    return table, str(path)


def numeric_column(table: pd.DataFrame, column: str, label: str) -> NDArray[np.float64]:
    """A column as float, with an error naming the first bad row."""
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raise DesignError(
            f"{label}: column {column!r} has a missing or non-numeric value "
            f"{table[column].iloc[row]!r} in row {row} (0-based, header excluded); "
            f"every event needs a number there"
        )
    return values


def read_events(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read and check an events table.

    Parameters
    ----------
    source : str, pathlib.Path or pandas.DataFrame
        A BIDS ``events.tsv`` (``n/a`` is missing), a ``.csv``, or a DataFrame with
        columns ``onset`` and ``duration`` (seconds) and optionally ``trial_type``
        (defaults to ``"dummy"``, as in nilearn) and ``modulation`` (defaults to 1).

    Returns
    -------
    pandas.DataFrame
        Columns ``trial_type`` (str), ``onset``, ``duration``, ``modulation`` (float);
        events with the same trial type, onset and duration are merged and their
        modulations summed (a ``BigGLMWarning`` says so). Other columns are dropped.

    Raises
    ------
    DesignError
        If a required column is missing, a value is missing or not a number, a
        duration is negative, or a trial type is missing; the message names the
        file, column and row.

    Examples
    --------
    >>> import pandas as pd
    >>> read_events(pd.DataFrame({"onset": [0, 10], "duration": [5, 5]}))
      trial_type  onset  duration  modulation
    0      dummy    0.0       5.0         1.0
    1      dummy   10.0       5.0         1.0
    """
    table, label = read_table(source, "events")
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise DesignError(
            f"{label} has no column {missing[0]!r} (found {list(table.columns)}); "
            "BIDS events need 'onset' and 'duration' in seconds"
        )
    onset = numeric_column(table, "onset", label)
    duration = numeric_column(table, "duration", label)
    negative = np.flatnonzero(duration < 0)
    if negative.size:
        row = int(negative[0])
        raise DesignError(
            f"{label}: negative duration {duration[row]} in row {row}; durations are >= 0 s"
        )
    if "modulation" in table.columns:
        modulation = numeric_column(table, "modulation", label)
    else:
        modulation = np.ones_like(onset)
    events = pd.DataFrame(
        {
            "trial_type": trial_types(table, label),
            "onset": onset,
            "duration": duration,
            "modulation": modulation,
        }
    )
    return _merge_duplicates(events, label)


def trial_types(table: pd.DataFrame, label: str) -> NDArray[np.str_] | str:
    """Trial types as strings, 'dummy' when the column is absent."""
    if "trial_type" not in table.columns:
        logger.info("%s has no 'trial_type' column: all events are condition 'dummy'", label)
        return "dummy"
    missing = np.flatnonzero(table["trial_type"].isna().to_numpy())
    if missing.size:
        raise DesignError(
            f"{label}: column 'trial_type' is empty in row {int(missing[0])}; "
            "give every event a condition name"
        )
    names = np.asarray(table["trial_type"].astype(str).to_numpy(), dtype=np.str_)
    _warn_if_padded(names, label)
    return names


def timing_table(
    events: str | Path | pd.DataFrame, convention: str, extra: Sequence[str] = ()
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Events for the SPM and FSL conventions: ``trial_type``, ``onset``, ``duration`` and
    ``modulation`` (1 when absent) checked per value, with the table read and its label.

    ``extra`` names further columns the convention needs (SPM's modulators); a missing
    column or a negative duration is refused with one message."""
    table, label = read_table(events, "events")
    missing = [c for c in (*_REQUIRED, *extra) if c not in table.columns]
    if missing:
        needs = "'onset' and 'duration'" + (" and every modulator named" if extra else "")
        raise DesignError(
            f"{label} has no column {missing[0]!r} (found {list(table.columns)}); the "
            f"{convention} convention needs {needs}"
        )
    out = pd.DataFrame({"trial_type": trial_types(table, label)}, index=table.index)
    for column in _REQUIRED:
        out[column] = numeric_column(table, column, label)
    if np.any(out["duration"] < 0):
        row = int(np.flatnonzero(out["duration"] < 0)[0])
        raise DesignError(f"{label}: negative duration in row {row}; durations are >= 0")
    has_height = "modulation" in table.columns
    out["modulation"] = numeric_column(table, "modulation", label) if has_height else 1.0
    return out, table, label


def _warn_if_padded(names: NDArray[np.str_], label: str) -> None:
    """Warn about trial types with leading or trailing spaces: each is a condition apart."""
    padded = np.flatnonzero(np.char.strip(names) != names)
    if padded.size:
        row = int(padded[0])
        name = str(names[row])
        warn_caller(
            f"{label}: trial_type {name!r} in row {row} has leading or trailing spaces, so "
            f"it is a condition apart from {name.strip()!r} ({padded.size} rows like it); "
            "remove the spaces in the file if they are the same condition"
        )


def _merge_duplicates(events: pd.DataFrame, label: str) -> pd.DataFrame:
    """Merge events with equal trial type, onset and duration by summing modulation."""
    keys = ["trial_type", "onset", "duration"]
    merged = events.groupby(keys, sort=False)["modulation"].sum().reset_index()
    if len(merged) != len(events):
        warn_caller(
            f"{label} has {len(events) - len(merged)} duplicated events (same trial_type, "
            "onset and duration); their modulations are summed"
        )
    return merged.reset_index(drop=True)


def oversampled_grid(
    frame_times: NDArray[np.float64], oversampling: int, min_onset: float
) -> NDArray[np.float64]:
    """The time grid on which event boxcars are built and convolved.

    It starts at ``frame_times[0] + min_onset`` and ends at
    ``frame_times[-1] * n / (n - 1)`` (nilearn's end point; it equals
    ``frame_times[-1] + tr`` when the first frame is at 0), with about ``oversampling``
    samples per TR.

    Parameters
    ----------
    frame_times : numpy.ndarray
        Increasing acquisition times (s), at least two.
    oversampling : int
        Samples per TR.
    min_onset : float
        Start of the grid relative to the first frame (s), usually negative.

    Returns
    -------
    numpy.ndarray
        The grid times (s).

    Raises
    ------
    DesignError
        If the grid would be longer than
        :data:`bigglm.design.options.MAX_GRID_SAMPLES`.

    Examples
    --------
    >>> oversampled_grid(np.array([0.0, 2.0, 4.0]), 2, -2.0)
    array([-2., -1.,  0.,  1.,  2.,  3.,  4.,  5.,  6.])
    """
    n = frame_times.size
    first, last = float(frame_times[0]), float(frame_times[-1])
    end = last * (1 + 1.0 / (n - 1))
    per_tr = (n - 1) * 1.0 / (last - first)
    n_samples = per_tr * ((end - first - min_onset) * oversampling) + 1
    n_samples = check_grid_samples(n_samples, oversampling)
    return np.linspace(first + min_onset, end, int(np.rint(n_samples)))


def _boxcar(
    grid: NDArray[np.float64],
    onset: NDArray[np.float64],
    duration: NDArray[np.float64],
    amplitude: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Sum of boxcars; an event starts at the first grid time >= its onset.

    A zero-duration event lasts one grid step (its area is ``amplitude * dt``).
    """
    last = grid.size - 1
    start = np.minimum(np.searchsorted(grid, onset), last)
    stop = np.minimum(np.searchsorted(grid, onset + duration), last)
    stop = np.where((stop == start) & (start < last), stop + 1, stop)
    steps = np.zeros(grid.size)
    np.add.at(steps, start, amplitude)
    np.add.at(steps, stop, -amplitude)
    return np.cumsum(steps)


def _column_names(condition: str, model: HRFModel, fir_delays: Sequence[int]) -> list[str]:
    """Regressor names of one condition, as nilearn names them."""
    if model is None:
        return [condition]
    if callable(model):
        return [f"{condition}_{getattr(model, '__name__', 'hrf')}"]
    if isinstance(model, str):
        if model.lower() == "fir":
            return [f"{condition}_delay_{int(d)}" for d in fir_delays]
        suffixes = ["", "_derivative", "_dispersion"][: 1 + model.count("+")]
        return [condition + s for s in suffixes]
    return [f"{condition}_{getattr(m, '__name__', 'hrf')}" for m in model]


def _convolve_and_sample(
    rows: pd.DataFrame,
    grid: NDArray[np.float64],
    frame_times: NDArray[np.float64],
    kernels: list[NDArray[np.float64]],
    is_fir: bool,
    oversampling: int,
) -> NDArray[np.float64]:
    """One condition's boxcar convolved with each kernel, sampled at the frame times.

    FIR columns are read ``oversampling - 1`` grid steps later (nilearn's convention):
    delay ``d`` averages the boxcar over the TR that starts ``d`` TRs before the frame.
    The other models' kernels after the first are orthogonalised to the earlier ones.
    """
    signal = _boxcar(
        grid, rows["onset"].to_numpy(), rows["duration"].to_numpy(), rows["modulation"].to_numpy()
    )
    shift = oversampling - 1 if is_fir else 0
    sampled = np.column_stack(
        [
            np.interp(frame_times, grid[: grid.size - shift], convolve_regressor(signal, k)[shift:])
            for k in kernels
        ]
    )
    return sampled if is_fir else orthogonalize_in_order(sampled)


def _check_timing(events: pd.DataFrame, frame_times: NDArray[np.float64], start: float) -> None:
    """Warn about events that cannot be (fully) modelled."""
    early = np.flatnonzero(events["onset"].to_numpy() < start)
    if early.size:
        warn_caller(
            f"{early.size} events start before {start:g} s (frame_times[0] + min_onset) and "
            f"are left out of the model (first: row {int(early[0])}); lower min_onset "
            "to keep them"
        )
    late = np.flatnonzero(events["onset"].to_numpy() > frame_times[-1])
    if late.size:
        warn_caller(
            f"{late.size} events start after the last frame ({frame_times[-1]:g} s) and "
            f"cannot affect the data (first: row {int(late[0])}, onset "
            f"{events['onset'].iloc[late[0]]:g} s); check the run's TR and length"
        )


def condition_regressors(
    events: pd.DataFrame,
    frame_times: NDArray[np.float64],
    *,
    hrf: HRFModel = "glover",
    oversampling: int = 50,
    fir_delays: Sequence[int] | None = None,
    min_onset: float = -24.0,
) -> pd.DataFrame:
    """Convolved regressors of every condition, sampled at the frame times.

    Parameters
    ----------
    events : pandas.DataFrame
        Output of :func:`read_events`.
    frame_times : numpy.ndarray
        Increasing acquisition times (s).
    hrf : str, callable, sequence of callables or None, default="glover"
        HRF model, see :func:`bigglm.design.hemodynamic.hrf_basis`.
    oversampling : int, default=50
        Samples per TR of the convolution grid.
    fir_delays : sequence of int, optional
        FIR delays in scans (default ``[0]``).
    min_onset : float, default=-24.0
        Events starting before ``frame_times[0] + min_onset`` are left out (warned).

    Returns
    -------
    pandas.DataFrame
        One column per condition (sorted by name) and kernel, indexed by frame time.

    Examples
    --------
    >>> ev = read_events(pd.DataFrame({"onset": [0.0], "duration": [4.0]}))
    >>> condition_regressors(ev, np.arange(3) * 2.0, hrf=None).round(2)
         dummy
    0.0    1.0
    2.0    1.0
    4.0    0.0
    """
    delays = [0] if fir_delays is None else [int(d) for d in fir_delays]
    oversampling = int(oversampling)
    tr = float(np.min(np.diff(frame_times)))
    grid = oversampled_grid(frame_times, oversampling, min_onset)
    _check_timing(events, frame_times, grid[0])
    kept = events[events["onset"].to_numpy() >= grid[0]]
    kernels = hrf_basis(hrf, tr, oversampling, fir_delays=delays)
    is_fir = isinstance(hrf, str) and hrf.lower() == "fir"
    columns: dict[str, NDArray[np.float64]] = {}
    for condition in np.unique(events["trial_type"].to_numpy()):
        rows = kept[kept["trial_type"] == condition]
        sampled = _convolve_and_sample(rows, grid, frame_times, kernels, is_fir, oversampling)
        for name, values in zip(_column_names(str(condition), hrf, delays), sampled.T, strict=True):
            if name in columns:
                raise DesignError(
                    f"two conditions both make a column {name!r}; rename a trial_type"
                )
            columns[name] = values
    return pd.DataFrame(columns, index=pd.Index(frame_times, name=None))
