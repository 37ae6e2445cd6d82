"""FSL FEAT's first-level design, rebuilt: the ``fsl`` convention.

What FEAT's ``feat_model`` does, and so what this module does. The rules marked
*verified* reproduce the ``design.mat`` of a real FSL 5.0.9 FEAT first level to 5e-7 of
each column's peak (``design.mat`` is printed with 7 significant digits;
``tests/test_design_fsl.py``); the others follow FEAT's documentation and are marked.

* **High-resolution model** (verified). Each EV is first built on a grid of
  ``dt = 0.05`` s from time 0: an event ``(onset, duration, height)`` (FEAT's 3-column
  format; a block design's square wave is a list of such events) is ``height`` on the
  bins ``round(onset / dt) .. round((onset + duration) / dt) - 1``; a zero duration is
  one bin.
* **Convolution** (verified for the gamma). The kernel is sampled at ``0, dt, 2 dt ..``
  over ``int(window / dt)`` samples and convolved causally; each output sample is divided
  by the sum of the kernel samples that overlapped the series (FEAT's renormalisation,
  so that a block starting at time 0 starts at its plateau and the kernel's scale does
  not matter). FEAT's *gamma* (``convolve = 2``) is the gamma density with mean
  ``delay`` and standard deviation ``sigma`` (defaults 6 s and 3 s), window
  ``delay + 5 sigma``; its *double-gamma* HRF (``convolve = 3``, FEAT's default) is
  the gamma of mean 6 s and variance 6 minus 1/6 of the gamma of mean 16 s and
  variance 16, with the window rule of the gamma applied to the undershoot (36 s; not
  checked against a FEAT output here).
* **Sampling** (verified). Scan ``i`` reads the high-resolution model at
  ``i TR + TR / 2`` (the middle of the volume), so these are the design's times.
* **Temporal derivative** (verified). ``numpy.gradient`` of the sampled EV (central
  differences of the scans, one-sided at the two ends), orthogonalised with respect to
  its demeaned EV.
* **High-pass** (FEAT's documented filter; not applied by the FEAT of the test, whose
  ``temphp_yn`` is 0). A Gaussian-weighted running line: at each scan, the intercept of
  a straight line fitted by least squares with weights ``exp(-d^2 / (2 sigma^2))`` over
  the scans ``d = -int(3 sigma) .. int(3 sigma)`` away (cut at the run's ends) is
  subtracted, ``sigma = cutoff / (2 TR)`` scans (``fslmaths -bptf``). It is linear in
  the series, :func:`fsl_highpass_matrix`. FEAT filters the data and every EV with it,
  so when ``high_pass`` is given the data must be filtered too:
  :func:`fsl_highpass_filter` does that to a ``(time, voxel)`` array, blockwise.
* **Demeaning** (verified). Every EV column has zero mean; FILM fits the demeaned data.
  bigglm adds a ``constant`` column instead of demeaning the data: for an OLS or FILM
  fit the EV estimates, residuals and t are the same (Frisch-Waugh).
* **Orthogonalisation** (FEAT's ``ortho`` option, documented). ``orthogonalise={"a":
  ["b", ...]}`` removes from EV ``a`` its least-squares fit on the listed EVs (after
  their derivatives, filtering and demeaning), as FEAT's "orthogonalise EV a wrt b".

With ``high_pass``, the derivative is taken before the filter and both are filtered;
that order, and the orthogonalisation options, were not in the FEAT run checked here.
Not rebuilt: FEAT's ``convolve_phase``, its Gaussian, basis-function (gamma, sine, FIR)
and custom convolutions, square and sinusoid waveforms given as parameters (give their
blocks as events instead), interaction EVs and confound EV files (use ``confounds``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy.special import gammaln

from bigglm.design.events import timing_table
from bigglm.exceptions import DesignError

__all__ = [
    "FEAT_DT",
    "feat_kernel",
    "fsl_design",
    "fsl_highpass_filter",
    "fsl_highpass_matrix",
]

#: FEAT's high-resolution time step (s) on which EVs are built and convolved.
FEAT_DT = 0.05

FSLHRF = Literal["double-gamma", "gamma", "none"]


def _gamma_mean_var(t: NDArray[np.float64], mean: float, var: float) -> NDArray[np.float64]:
    """The gamma density of the given mean and variance (FSL's ``gammapdf``), 0 at t <= 0."""
    shape, scale = mean * mean / var, var / mean
    out = np.zeros_like(t)
    pos = t > 0
    tp = t[pos]
    out[pos] = np.exp(
        (shape - 1) * np.log(tp) - tp / scale - gammaln(shape) - shape * np.log(scale)
    )
    return out


def _grid(window: float, dt: float) -> NDArray[np.float64]:
    """``int(window / dt)`` sample times from 0, FEAT's kernel window."""
    return np.arange(int(window / dt), dtype=np.float64) * np.float64(dt)


def feat_kernel(
    hrf: FSLHRF = "double-gamma", *, sigma: float = 3.0, delay: float = 6.0, dt: float = FEAT_DT
) -> NDArray[np.float64]:
    """FEAT's convolution kernel sampled at ``0, dt, 2 dt ..`` (see the module text).

    Parameters
    ----------
    hrf : {"double-gamma", "gamma", "none"}, default="double-gamma"
    sigma, delay : float, default=3, 6
        The gamma's standard deviation and mean (s); only for ``"gamma"``.
    dt : float, default=0.05
        Sampling step (s).

    Returns
    -------
    numpy.ndarray
        The kernel (unnormalised: FEAT's convolution renormalises it).

    Raises
    ------
    DesignError
        For an unknown ``hrf`` or a non-positive ``sigma`` or ``delay``.

    Examples
    --------
    >>> feat_kernel("gamma").shape  # (6 + 5 * 3) / 0.05 samples
    (420,)
    """
    if hrf == "none":
        return np.ones(1)
    if hrf == "gamma":
        if sigma <= 0 or delay <= 0:
            raise DesignError(f"gamma sigma={sigma} and delay={delay} must both be > 0 (s)")
        t = _grid(delay + 5 * sigma, dt)
        return _gamma_mean_var(t, delay, sigma * sigma)
    if hrf == "double-gamma":
        t = _grid(16.0 + 5 * 4.0, dt)
        undershoot = _gamma_mean_var(t, 16.0, 16.0) / 6.0
        return np.asarray(_gamma_mean_var(t, 6.0, 6.0) - undershoot, dtype=np.float64)
    raise DesignError(
        f"hrf={hrf!r} is not a FEAT convolution; use 'double-gamma', 'gamma' or 'none'"
    )


def _feat_convolve(x: NDArray[np.float64], kernel: NDArray[np.float64]) -> NDArray[np.float64]:
    """Causal convolution, each sample divided by the kernel mass that overlapped it."""
    out = np.convolve(x, kernel)[: x.size]
    overlap = np.cumsum(kernel)[np.minimum(np.arange(x.size), kernel.size - 1)]
    empty = overlap == 0  # the kernel's first sample is 0: nothing has arrived yet
    return np.where(empty, 0.0, out / np.where(empty, 1.0, overlap))


def _stimulus(rows: pd.DataFrame, n_bins: int, dt: float) -> NDArray[np.float64]:
    """One EV on the high-resolution grid from its events (FEAT's 3-column format)."""
    steps = np.zeros(n_bins + 1)
    start = np.round(rows["onset"].to_numpy(float) / dt).astype(np.int64)
    stop = np.maximum(
        np.round((rows["onset"] + rows["duration"]).to_numpy(float) / dt).astype(np.int64),
        start + 1,
    )
    heights = rows["modulation"].to_numpy(float)
    np.add.at(steps, np.clip(start, 0, n_bins), heights)
    np.add.at(steps, np.clip(stop, 0, n_bins), -heights)
    return np.cumsum(steps)[:n_bins]


def fsl_highpass_matrix(n_scans: int, sigma: float) -> NDArray[np.float64]:
    """FSL's Gaussian-weighted running-line high-pass filter as an ``(n, n)`` matrix.

    ``F @ y`` is ``fslmaths -bptf sigma -1`` of the series ``y`` (before FEAT adds the
    mean back): ``y`` minus, at each scan, the intercept of the weighted line fit over
    the scans within ``int(3 sigma)``.

    Parameters
    ----------
    n_scans : int
    sigma : float
        In scans: FEAT's ``cutoff / (2 TR)``.

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    DesignError
        If ``sigma`` is not positive.

    Examples
    --------
    >>> F = fsl_highpass_matrix(20, 5.0)
    >>> bool(np.allclose(F @ (3.0 + 0.5 * np.arange(20)), 0))  # lines are removed
    True
    """
    if not sigma > 0:
        raise DesignError(f"high-pass sigma={sigma} scans must be > 0")
    half = int(sigma * 3)
    d = np.arange(n_scans)[None, :] - np.arange(n_scans)[:, None]  # tt - t
    w = np.where(np.abs(d) <= half, np.exp(-0.5 * d * d / (sigma * sigma)), 0.0)
    n, a, c = w.sum(1), (w * d).sum(1), (w * d * d).sum(1)
    denom = c * n - a * a
    fit = w * (c[:, None] - a[:, None] * d) / np.where(denom == 0, 1.0, denom)[:, None]
    fit[denom == 0] = 0.0  # FSL leaves a scan whose line is undetermined as it is
    return np.eye(n_scans) - fit


def fsl_highpass_filter(
    data: Any, tr: float, cutoff: float = 100.0, *, keep_mean: bool = True
) -> Any:
    """Filter a ``(time, voxel)`` array as FEAT filters the data (``sigma = cutoff / (2 TR)``).

    The filter is linear along time, ``F @ data``: a dask array (any chunks, time
    chunks included: the product sums over them) stays lazy and is filtered block by
    block; a numpy array is filtered at once.

    Parameters
    ----------
    data : numpy.ndarray or dask.array.Array
        Shape ``(time, voxel)`` (or ``(time,)``).
    tr : float
        Repetition time (s).
    cutoff : float, default=100
        FEAT's high-pass cut-off period (s).
    keep_mean : bool, default=True
        Add each voxel's temporal mean back, as FEAT's pre-statistics do.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        Same shape, float64.

    Raises
    ------
    DesignError
        For a cut-off or TR that is not positive.

    Examples
    --------
    >>> y = np.column_stack([np.arange(45.0), np.ones(45)])
    >>> bool(np.allclose(fsl_highpass_filter(y, 3.0, keep_mean=False), 0))
    True
    """
    if not (cutoff > 0 and tr > 0):
        raise DesignError(f"high-pass cutoff={cutoff} s and tr={tr} s must both be > 0")
    F = fsl_highpass_matrix(int(data.shape[0]), cutoff / (2.0 * tr))
    out = F @ data
    if keep_mean:
        out = out + data.mean(axis=0)
    return out


def _check_cutoff(cutoff: float, tr: float) -> float:
    value = float(cutoff)
    if not (np.isfinite(value) and value >= 2 * tr):
        hint = f" (did you mean {1 / value:g} s?)" if 0 < value < 1 else ""
        raise DesignError(
            f"high_pass={cutoff!r}: in the fsl convention it is FEAT's cut-off period in "
            f"seconds, at least two scans ({2 * tr:g} s){hint}; FEAT's default is 100, "
            "None for no filter"
        )
    return value


def _events_table(events: object) -> pd.DataFrame:
    return timing_table(events, "fsl", ())[0]  # type: ignore[arg-type]


def _demean(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return x - x.mean()


def _project_out(x: NDArray[np.float64], others: NDArray[np.float64]) -> NDArray[np.float64]:
    coef = np.linalg.lstsq(others, x, rcond=None)[0]
    return x - others @ coef


def _ev_columns(
    rows: pd.DataFrame, name: str, n_scans: int, tr: float, kernel: NDArray[np.float64], deriv: bool
) -> dict[str, NDArray[np.float64]]:
    n_bins = round(n_scans * tr / FEAT_DT)
    model = _feat_convolve(_stimulus(rows, n_bins, FEAT_DT), kernel)
    sample = np.round((np.arange(n_scans) * tr + tr / 2) / FEAT_DT).astype(np.int64)
    ev = model[np.minimum(sample, n_bins - 1)]
    out = {name: ev}
    if deriv:
        out[name + "_derivative"] = np.gradient(ev)
    return out


def fsl_design(
    n_scans: int,
    tr: float,
    events: object | None = None,
    *,
    hrf: FSLHRF = "double-gamma",
    derivative: bool = False,
    high_pass: float | None = 100.0,
    gamma_sigma: float = 3.0,
    gamma_delay: float = 6.0,
    orthogonalise: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """One run's design as FEAT builds it (see the module text for every rule).

    Parameters
    ----------
    n_scans : int
    tr : float
        Repetition time (s).
    events : str, pathlib.Path or pandas.DataFrame, optional
        ``onset``, ``duration``, ``trial_type`` (one EV each, in order of first
        appearance) and optional ``modulation`` heights (FEAT's 3-column files).
    hrf : {"double-gamma", "gamma", "none"}, default="double-gamma"
        FEAT's convolution (``convolve`` 3, 2 or 0).
    derivative : bool, default=False
        Add each EV's temporal derivative (FEAT's ``deriv_yn``), ``<ev>_derivative``.
    high_pass : float or None, default=100
        FEAT's high-pass cut-off (s) applied to every EV; None for none. The data must
        then be filtered too (:func:`fsl_highpass_filter`).
    gamma_sigma, gamma_delay : float, default=3, 6
        The gamma's standard deviation and mean lag (s).
    orthogonalise : mapping of str to sequence of str, optional
        ``{"a": ["b"]}``: orthogonalise EV ``a`` with respect to EV ``b``.

    Returns
    -------
    pandas.DataFrame
        The demeaned EVs (and derivatives), then ``constant``; indexed by the sampling
        times ``i TR + TR / 2``.

    Raises
    ------
    DesignError
        For a bad option or events table.

    Examples
    --------
    >>> import pandas as pd
    >>> ev = pd.DataFrame({"onset": [0.0, 60.0], "duration": [30.0, 30.0], "trial_type": "on"})
    >>> X = fsl_design(40, 3.0, ev, hrf="gamma", derivative=True)
    >>> list(X.columns), float(X.index[0])
    (['on', 'on_derivative', 'constant'], 1.5)
    """
    kernel = feat_kernel(hrf, sigma=gamma_sigma, delay=gamma_delay)
    columns: dict[str, NDArray[np.float64]] = {}
    if events is not None:
        table = _events_table(events)
        for name in pd.unique(table["trial_type"].astype(str)):
            rows = table[table["trial_type"].astype(str) == name]
            columns.update(_ev_columns(rows, name, n_scans, tr, kernel, derivative))
    if high_pass is not None:
        F = fsl_highpass_matrix(n_scans, _check_cutoff(high_pass, tr) / (2.0 * tr))
        columns = {k: F @ v for k, v in columns.items()}
    columns = {k: _demean(v) for k, v in columns.items()}
    for name in list(columns):
        if name.endswith("_derivative") and name[: -len("_derivative")] in columns:
            parent = columns[name[: -len("_derivative")]]
            columns[name] = _project_out(columns[name], parent[:, None])
    for name, against in (orthogonalise or {}).items():
        unknown = [e for e in [name, *against] if e not in columns]
        if unknown:
            raise DesignError(
                f"orthogonalise names EV(s) {unknown} that the design lacks; EVs: {list(columns)}"
            )
        columns[name] = _project_out(columns[name], np.column_stack([columns[e] for e in against]))
    columns["constant"] = np.ones(n_scans)
    times = np.arange(n_scans) * tr + tr / 2
    return pd.DataFrame(columns, index=pd.Index(times))
