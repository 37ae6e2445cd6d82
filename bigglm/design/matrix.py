"""Assemble a run's design matrix: events, confounds, drifts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from bigglm.design._warnings import warn_caller
from bigglm.design.confounds import FillNA, load_confounds, scrubbing_regressors
from bigglm.design.diagnostics import dependent_columns
from bigglm.design.drift import drift_regressors
from bigglm.design.events import HRFModel, condition_regressors, read_events
from bigglm.design.options import (
    check_drift_order,
    check_fir_delays,
    check_high_pass,
    check_min_onset,
    check_oversampling,
    check_tr,
)
from bigglm.exceptions import DesignError
from bigglm.typing import DesignConvention

__all__ = ["frame_times", "make_design", "make_run_design"]


def frame_times(n_scans: int, tr: float, slice_time_ref: float = 0.0) -> NDArray[np.float64]:
    """Acquisition times of the volumes, ``(arange(n_scans) + slice_time_ref) * tr``.

    Parameters
    ----------
    n_scans : int
        Number of volumes.
    tr : float
        Repetition time (s).
    slice_time_ref : float, default=0.0
        Fraction of the TR at which each volume is considered acquired (0 = start, as
        in nilearn's ``FirstLevelModel``; 0.5 after slice-timing correction to the middle
        slice).

    Returns
    -------
    numpy.ndarray
        ``n_scans`` times in seconds.

    Raises
    ------
    DesignError
        If ``n_scans < 2``, ``tr`` is not in (0, 100] s (see
        :func:`bigglm.design.options.check_tr`) or ``slice_time_ref`` is outside [0, 1].

    Examples
    --------
    >>> frame_times(4, 2.0, slice_time_ref=0.5)
    array([1., 3., 5., 7.])
    """
    if n_scans < 2:
        raise DesignError(f"need n_scans >= 2, got n_scans={n_scans}")
    tr = check_tr(tr)
    if not 0.0 <= slice_time_ref <= 1.0:
        raise DesignError(f"slice_time_ref must be in [0, 1], got {slice_time_ref}")
    start = slice_time_ref * tr
    return np.linspace(start, (n_scans - 1 + slice_time_ref) * tr, n_scans)


def _check_frame_times(times: ArrayLike) -> NDArray[np.float64]:
    """Frame times as a float vector, strictly increasing."""
    out = np.asarray(times, dtype=np.float64)
    if out.ndim != 1 or out.size < 2 or not np.all(np.isfinite(out)):
        raise DesignError(
            f"frame_times must be a 1-D array of at least 2 finite times, got shape {out.shape}"
        )
    steps = np.diff(out)
    if np.any(steps <= 0):
        row = int(np.flatnonzero(steps <= 0)[0]) + 1
        raise DesignError(
            f"frame_times must increase, but frame {row} ({out[row]:g} s) is not after "
            f"frame {row - 1} ({out[row - 1]:g} s); use bigglm.design.frame_times(n, tr)"
        )
    return out


def _confound_block(confounds: ArrayLike | pd.DataFrame, n_scans: int) -> pd.DataFrame:
    """User regressors as a DataFrame (columns ``reg0 ..`` for arrays), checked."""
    if isinstance(confounds, pd.DataFrame):
        table = confounds.astype(np.float64)
        table.columns = [str(c) for c in table.columns]
    else:
        values = np.asarray(confounds, dtype=np.float64)
        values = values[:, None] if values.ndim == 1 else values
        table = pd.DataFrame(values, columns=[f"reg{k}" for k in range(values.shape[1])])
    if len(table) != n_scans:
        raise DesignError(
            f"confounds have {len(table)} rows but there are {n_scans} frame times; "
            "give one row per volume"
        )
    bad = table.isna().to_numpy()
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise DesignError(
            f"confounds column {table.columns[col]!r} is missing a value in row {row}; "
            "fill it (bigglm.design.load_confounds fills fMRIPrep's leading n/a)"
        )
    values = table.to_numpy()
    infinite = ~np.isfinite(values)
    if infinite.any():
        row, col = (int(v[0]) for v in np.nonzero(infinite))
        raise DesignError(
            f"confounds column {table.columns[col]!r} is {values[row, col]} in row {row}; "
            "regressors must be finite numbers; fix or drop the column"
        )
    return table.reset_index(drop=True)


def make_design(
    frame_times: ArrayLike,
    events: str | Path | pd.DataFrame | None = None,
    *,
    hrf: HRFModel = "glover",
    drift: str | None = "cosine",
    high_pass: float = 0.01,
    drift_order: int = 1,
    fir_delays: Sequence[int] | None = None,
    confounds: ArrayLike | pd.DataFrame | None = None,
    oversampling: int = 50,
    min_onset: float = -24,
) -> pd.DataFrame:
    """Build a first-level design matrix, column for column as nilearn does.

    Columns: the conditions (sorted by name, each with its HRF kernels), then the
    confounds, then ``drift_1 .. drift_K`` and ``constant``. Given the same arguments
    as nilearn's ``make_first_level_design_matrix`` (``hrf_model``, ``drift_model``,
    ``add_regs``), the columns have the same names, order and values (to 1e-6 of
    each column's largest magnitude).

    Differences from nilearn 0.14.1: a rank-deficient design is returned exactly as built,
    with a ``BigGLMWarning`` naming the dependent columns (nilearn nudges its singular
    values by ~1e-15 of the largest and only says "singular"), events starting before
    ``frame_times[0] + min_onset`` are left out (nilearn moves them to its grid start),
    and bad input raises :class:`~bigglm.DesignError` naming the file, row or column.

    Parameters
    ----------
    frame_times : array_like
        Increasing acquisition times (s), e.g. :func:`frame_times`.
    events : str, pathlib.Path, pandas.DataFrame or None
        BIDS events (see :func:`bigglm.design.events.read_events`).
    hrf : str, callable, list of callables or None, default="glover"
        ``"spm"``, ``"glover"``, ``"<model> + derivative"``,
        ``"<model> + derivative + dispersion"``, ``"fir"``, a callable
        ``f(tr, oversampling)`` (columns ``<condition>_<f.__name__>``) or None.
    drift : {"cosine", "polynomial", None}, default="cosine"
        Drift model.
    high_pass : float, default=0.01
        Cosine cut-off (Hz).
    drift_order : int, default=1
        Polynomial order.
    fir_delays : sequence of int, optional
        FIR delays in scans (default ``[0]``); columns ``<condition>_delay_<d>``.
    confounds : array_like or pandas.DataFrame, optional
        Extra regressors, one row per frame (array columns are named ``reg0 ..``).
    oversampling : int, default=50
        Samples per TR of the convolution grid.
    min_onset : float, default=-24
        Events starting before ``frame_times[0] + min_onset`` are left out.

    Returns
    -------
    pandas.DataFrame
        Float64, indexed by frame time.

    Raises
    ------
    DesignError
        For bad frame times, events, confounds or options (out of the ranges of
        :mod:`bigglm.design.options`), duplicated column names, or at least as many
        columns as frames.

    Examples
    --------
    >>> import pandas as pd
    >>> events = pd.DataFrame({"onset": [0, 20], "duration": [10, 10], "trial_type": ["a", "b"]})
    >>> X = make_design(frame_times(40, 2.0), events, drift="polynomial", drift_order=2)
    >>> list(X.columns)
    ['a', 'b', 'drift_1', 'drift_2', 'constant']
    """
    times = _check_frame_times(frame_times)
    cosine = isinstance(drift, str) and drift.lower() == "cosine"
    dt = (times[-1] - times[0]) / (times.size - 1)
    high_pass = check_high_pass(high_pass, float(dt) if cosine else None)
    drift_order = check_drift_order(drift_order, times.size)
    blocks = []
    if events is not None:
        blocks.append(
            condition_regressors(
                read_events(events),
                times,
                hrf=hrf,
                oversampling=check_oversampling(oversampling),
                fir_delays=check_fir_delays(fir_delays, times.size),
                min_onset=check_min_onset(min_onset),
            ).reset_index(drop=True)
        )
    if confounds is not None:
        blocks.append(_confound_block(confounds, times.size))
    blocks.append(
        drift_regressors(times, drift, high_pass=high_pass, order=drift_order).reset_index(
            drop=True
        )
    )
    design = pd.concat(blocks, axis=1)
    duplicated = design.columns[design.columns.duplicated()].unique().tolist()
    if duplicated:
        raise DesignError(
            f"design columns {duplicated} appear twice; rename the condition or confound "
            "('constant' and 'drift_*' are reserved)"
        )
    design.index = pd.Index(times)
    _check_columns_fit(design)
    _warn_if_rank_deficient(design)
    return design.astype(np.float64)


def _check_columns_fit(design: pd.DataFrame) -> None:
    """Refuse a design with at least as many columns as frames: no residual is left."""
    n_scans, n_columns = design.shape
    if n_columns >= n_scans:
        raise DesignError(
            f"the design has {n_columns} regressors but only {n_scans} scans, so nothing is "
            "left to estimate the noise; use fewer regressors (a lower high_pass or "
            "drift_order, fewer confounds or FIR delays)"
        )


def _warn_if_rank_deficient(design: pd.DataFrame) -> None:
    """A BigGLMWarning naming the columns of each linear dependency."""
    groups = dependent_columns(design)
    if groups:
        described = "; ".join(
            f"{g[0]!r} is all zeros" if len(g) == 1 else " ~ ".join(repr(n) for n in g)
            for g in groups
        )
        warn_caller(
            f"the design is rank deficient ({described}); contrasts that separate "
            "these columns are not estimable; bigglm keeps the design as built and fits "
            "with the pseudo-inverse (bigglm.design.check_estimable tests a contrast)"
        )


def make_run_design(
    n_scans: int,
    tr: float,
    *,
    events: str | Path | pd.DataFrame | None = None,
    confounds: str | Path | pd.DataFrame | None = None,
    confound_columns: Sequence[str] | None = None,
    sample_mask: ArrayLike | None = None,
    slice_time_ref: float = 0.0,
    fill_na: FillNA = "mean",
    convention: DesignConvention = "nilearn",
    **model: Any,
) -> pd.DataFrame:
    """The design of one run from its files: what a YAML config's run entry needs.

    Parameters
    ----------
    n_scans : int
        Volumes in the run.
    tr : float
        Repetition time (s).
    events : str, pathlib.Path or pandas.DataFrame, optional
        The run's ``events.tsv``.
    confounds : str, pathlib.Path or pandas.DataFrame, optional
        The run's ``*_desc-confounds_timeseries.tsv``.
    confound_columns : sequence of str, optional
        Names or glob patterns to keep (all columns if omitted).
    sample_mask : array_like, optional
        Volumes to keep (bool mask or indices); each other volume gets a spike column.
    slice_time_ref : float, default=0.0
        See :func:`frame_times`.
    fill_na : {"mean", "zero", "next"}, default="mean"
        Leading ``n/a`` filling, see :func:`bigglm.design.load_confounds`.
    convention : {"nilearn", "spm12", "spm8", "spm5", "fsl"}, default="nilearn"
        Whose rules build the event and drift columns: nilearn's
        (:func:`make_design`), an SPM release's (:func:`bigglm.design.spm.spm_design`:
        microtime grid, ``spm_hrf`` basis, DCT high-pass with ``high_pass`` a cut-off
        period in seconds, 128 by default), or FSL FEAT's
        (:func:`bigglm.design.fsl.fsl_design`: 0.05 s model grid, double-gamma or gamma
        HRF, temporal derivatives, the running-line high-pass on the EVs, 100 s by
        default, which the data then need too). Confounds and spike columns go before
        the drift or constant columns either way.
    **model
        Keyword arguments of :func:`make_design` (``hrf``, ``drift``, ``high_pass``,
        ``drift_order``, ``fir_delays``, ``oversampling``, ``min_onset``), or in an SPM
        convention of :func:`~bigglm.design.spm.spm_design` (``hrf``, ``high_pass``,
        ``microtime_resolution``, ``microtime_onset``, ``units``, ``modulators``), or in
        the fsl convention of :func:`~bigglm.design.fsl.fsl_design` (``hrf``,
        ``derivative``, ``high_pass``, ``gamma_sigma``, ``gamma_delay``,
        ``orthogonalise``).

    Returns
    -------
    pandas.DataFrame
        The design, ``n_scans`` rows.

    Raises
    ------
    DesignError
        For a bad file, a confounds length that differs from ``n_scans``, or an
        unknown keyword in ``model``.

    Examples
    --------
    >>> import pandas as pd
    >>> ev = pd.DataFrame({"onset": [4.0], "duration": [2.0], "trial_type": ["go"]})
    >>> X = make_run_design(10, 2.0, events=ev, sample_mask=[0, 1, 2, 3, 4, 5, 6, 8, 9],
    ...                     drift=None)
    >>> list(X.columns)
    ['go', 'scrub_7', 'constant']
    """
    _check_model_options(model, convention, slice_time_ref)
    blocks = []
    if confounds is not None:
        blocks.append(load_confounds(confounds, confound_columns, n_scans=n_scans, fill_na=fill_na))
    if sample_mask is not None:
        blocks.append(scrubbing_regressors(sample_mask, n_scans))
    extra = pd.concat(blocks, axis=1) if blocks else None
    if convention == "nilearn":
        times = frame_times(n_scans, tr, slice_time_ref)
        return make_design(times, events, confounds=extra, **model)
    frame_times(n_scans, tr)  # the same checks of n_scans and tr as the nilearn path
    if convention == "fsl":
        from bigglm.design.fsl import fsl_design

        design = fsl_design(n_scans, check_tr(tr), events, **model)
    else:
        from bigglm.design.spm import spm_design

        design = spm_design(n_scans, check_tr(tr), events, convention=convention, **model)
    return _with_confounds(design, extra)


_NILEARN_OPTIONS = (
    "hrf",
    "drift",
    "high_pass",
    "drift_order",
    "fir_delays",
    "oversampling",
    "min_onset",
)
_SPM_OPTIONS = (
    "hrf",
    "high_pass",
    "microtime_resolution",
    "microtime_onset",
    "units",
    "modulators",
)

_FSL_OPTIONS = (
    "hrf",
    "derivative",
    "high_pass",
    "gamma_sigma",
    "gamma_delay",
    "orthogonalise",
)


def _check_model_options(model: dict[str, Any], convention: str, slice_time_ref: float) -> None:
    """Refuse the options another convention understands, naming the convention."""
    if convention not in get_args(DesignConvention):
        raise DesignError(
            f"convention={convention!r} is not known; use one of {list(get_args(DesignConvention))}"
        )
    allowed = {"nilearn": _NILEARN_OPTIONS, "fsl": _FSL_OPTIONS}.get(convention, _SPM_OPTIONS)
    unknown = sorted(set(model) - set(allowed))
    if unknown:
        raise DesignError(
            f"unknown design option(s) {unknown} for the {convention} convention; "
            f"allowed: {list(allowed)}"
        )
    if convention != "nilearn" and slice_time_ref:
        raise DesignError(
            f"slice_time_ref={slice_time_ref} is nilearn's option; in the {convention} "
            "convention the sampling time within a scan is fixed by the convention "
            "(microtime_onset, SPM's fmri_t0; the middle of the volume in FEAT)"
        )


def _with_confounds(design: pd.DataFrame, extra: pd.DataFrame | None) -> pd.DataFrame:
    """Confound and spike columns inserted before the drift columns."""
    if extra is None:
        return design
    first_drift = next(
        i for i, c in enumerate(design.columns) if c.startswith("drift_") or c == "constant"
    )
    extra = extra.set_axis(design.index, axis=0)
    out = pd.concat([design.iloc[:, :first_drift], extra, design.iloc[:, first_drift:]], axis=1)
    duplicated = out.columns[out.columns.duplicated()].unique().tolist()
    if duplicated:
        raise DesignError(f"design columns {duplicated} appear twice; rename the confound")
    _check_columns_fit(out)
    _warn_if_rank_deficient(out)
    return out.astype(np.float64)
