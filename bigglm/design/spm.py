"""SPM's first-level design, rebuilt exactly: the ``spm5``, ``spm8`` and ``spm12`` conventions.

What SPM does, and so what this module does (checked against the designs SPM5, SPM8 and
SPM12 built in MATLAB, ``tests/test_design_spm.py``):

* **Microtime.** Stimulus functions live on a grid of ``T`` bins per scan (``fmri_t``,
  default 16), ``dt = TR / T``. An event at onset ``o`` starts at bin ``round(o / dt)``
  after the grid's time zero and covers ``round(d / dt) + 1`` bins of height 1 (so a
  duration rounds to the bin); a condition whose durations are all zero is a train of
  one-bin spikes of height ``1 / dt`` (area 1). Time zero is bin 33 (1-based) in SPM12
  and bin 32 in SPM5/8.
* **Basis.** ``spm_hrf`` at ``dt`` (a peak-minus-undershoot gamma difference computed at
  ``dt / T`` and decimated, unit sum); its temporal derivative is the difference with
  the HRF delayed by 1 s, its dispersion derivative the difference with the peak
  dispersion raised by 0.01, each divided by its step, and the basis is orthogonalised
  in order (``spm_orth``: no rescaling).
* **Sampling.** The convolved regressor is read at bin ``i T + T0 + 32`` (1-based) for
  scan ``i``, ``T0`` the microtime onset (``fmri_t0``: 8 in SPM12's defaults, 1 in
  SPM5/8's), i.e. at ``i TR + (T0 - 1) dt`` in SPM12 and ``i TR + T0 dt`` in SPM5/8;
  these times index the returned design. Each condition's columns (basis functions and
  parametric modulators) are then orthogonalised in order, as ``spm_fMRI_design`` does.
* **High-pass.** SPM filters data and design with the residual-forming projector of
  ``K.X0``, the DCT set ``spm_dctmtx(n, k)`` without its constant, ``k = fix(2 n TR /
  cutoff + 1)``. Here those cosines are columns of the design (``drift_1 ..``): for the
  estimates, residuals, t and F and the degrees of freedom of an OLS fit this is the same
  model (Frisch-Waugh), and it keeps the one design that bigglm's engine broadcasts.
* **Constant.** One per run (SPM's ``Sn(s) constant``); several runs are several designs.

Parametric modulators (``modulators=[...]``, columns of the events table) enter as in SPM
with polynomial order 1: the column ``<condition>_x_<name>`` holds the modulator values
as spike heights, orthogonalised in order to the main column (which mean-centres them)
and to the earlier modulators. SPM's Volterra (interaction) terms and its FIR and Fourier
bases are not rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy.special import gammaln

from bigglm.design.events import timing_table
from bigglm.design.orthogonal import orthogonalize_in_order
from bigglm.exceptions import DesignError

__all__ = [
    "SPM_HRF_PARAMETERS",
    "SPMConvention",
    "spm_basis",
    "spm_dctmtx",
    "spm_design",
    "spm_hrf",
]

#: ``spm_hrf``'s defaults: peak delay 6 s, undershoot delay 16 s, their dispersions 1 and 1,
#: peak-to-undershoot ratio 6, onset 0 s, kernel length 32 s.
SPM_HRF_PARAMETERS: tuple[float, ...] = (6.0, 16.0, 1.0, 1.0, 6.0, 0.0, 32.0)

SPMVersion = Literal["spm5", "spm8", "spm12"]
Units = Literal["secs", "scans"]

_BASES = {"spm": 1, "spm + derivative": 2, "spm + derivative + dispersion": 3}


@dataclass(frozen=True)
class SPMConvention:
    """Where one SPM release puts time zero and, by default, the sampling bin.

    Attributes
    ----------
    version : {"spm5", "spm8", "spm12"}
    zero_bin : int
        1-based microtime bin of time zero (33 in SPM12, 32 before).
    default_onset : int
        Default microtime onset ``fmri_t0`` (8 in SPM12, 1 before).
    """

    version: SPMVersion
    zero_bin: int
    default_onset: int

    @classmethod
    def of(cls, version: str) -> SPMConvention:
        """The convention of ``"spm5"``, ``"spm8"`` or ``"spm12"``."""
        if version == "spm12":
            return cls("spm12", 33, 8)
        if version in ("spm5", "spm8"):
            return cls(version, 32, 1)  # type: ignore[arg-type]
        raise DesignError(f"convention {version!r} is not an SPM release; use spm5, spm8 or spm12")

    def sample_offset(self, microtime_onset: int, dt: float) -> float:
        """Seconds from a scan's start to where its regressor value is read."""
        return (microtime_onset + 32 - self.zero_bin) * dt


def _gamma_density(x: NDArray[np.float64], shape: float, rate: float) -> NDArray[np.float64]:
    """``spm_Gpdf``: the gamma density of shape and rate, zero for ``x <= 0``."""
    out = np.zeros_like(x)
    positive = x > 0
    xp = x[positive]
    out[positive] = np.exp(
        shape * np.log(rate) + (shape - 1) * np.log(xp) - rate * xp - gammaln(shape)
    )
    return out


def spm_hrf(
    rt: float, parameters: Sequence[float] | None = None, *, microtime_resolution: int = 16
) -> NDArray[np.float64]:
    """SPM's canonical HRF sampled every ``rt`` seconds (``spm_hrf(RT, P, T)``).

    Parameters
    ----------
    rt : float
        Sampling interval (s).
    parameters : sequence of float, optional
        The first values of :data:`SPM_HRF_PARAMETERS` to replace.
    microtime_resolution : int, default=16
        ``T``: the gamma densities are computed at ``rt / T`` and decimated.

    Returns
    -------
    numpy.ndarray
        ``floor(length / rt) + 1`` values summing to 1.

    Examples
    --------
    >>> h = spm_hrf(2.0)
    >>> h.size, round(float(h.sum()), 12), int(h.argmax())
    (17, 1.0, 3)
    """
    p = np.array(SPM_HRF_PARAMETERS)
    given = [] if parameters is None else list(parameters)
    if len(given) > p.size:
        raise DesignError(f"spm_hrf takes at most {p.size} parameters, got {len(given)}")
    p[: len(given)] = given
    if rt <= 0 or microtime_resolution < 1 or np.any(p[[0, 1, 2, 3, 4, 6]] <= 0):
        raise DesignError(f"spm_hrf needs rt > 0, T >= 1 and positive parameters; got {rt}, {p}")
    dt = rt / microtime_resolution
    u = np.arange(int(np.ceil(p[6] / dt)) + 1) - p[5] / dt
    kernel = _gamma_density(u, p[0] / p[2], dt / p[2]) - (
        _gamma_density(u, p[1] / p[3], dt / p[3]) / p[4]
    )
    kernel = kernel[np.arange(int(np.floor(p[6] / rt)) + 1) * microtime_resolution]
    return kernel / kernel.sum()


def spm_basis(
    dt: float, hrf: str = "spm", *, microtime_resolution: int = 16, orthogonal: bool = True
) -> NDArray[np.float64]:
    """The canonical HRF and, by name, its temporal and dispersion derivatives at ``dt``.

    As ``spm_get_bf`` builds them: derivatives by finite differences (1 s of onset, 0.01
    of peak dispersion), then orthogonalised in order unless ``orthogonal=False``.

    Parameters
    ----------
    dt : float
        Sampling interval of the basis (s): SPM's microtime bin ``TR / T``.
    hrf : {"spm", "spm + derivative", "spm + derivative + dispersion"}
    microtime_resolution : int, default=16
        Passed to :func:`spm_hrf`.
    orthogonal : bool, default=True
        Orthogonalise the columns in order (``spm_orth``).

    Returns
    -------
    numpy.ndarray
        Shape ``(n, 1..3)``.

    Examples
    --------
    >>> spm_basis(0.1, "spm + derivative").shape
    (321, 2)
    """
    n = _BASES.get(hrf)
    if n is None:
        raise DesignError(
            f"hrf={hrf!r} is not an SPM basis; in an SPM convention use one of {list(_BASES)}"
        )
    canonical = spm_hrf(dt, microtime_resolution=microtime_resolution)
    columns = [canonical]
    steps = ((5, 1.0), (2, 0.01))  # (parameter index, step): onset, peak dispersion
    for index, step in steps[: n - 1]:
        changed = list(SPM_HRF_PARAMETERS)
        changed[index] += step
        moved = spm_hrf(dt, changed, microtime_resolution=microtime_resolution)
        columns.append((canonical - moved) / step)
    basis = np.column_stack(columns)
    return orthogonalize_in_order(basis) if orthogonal else basis


def spm_dctmtx(n: int, k: int) -> NDArray[np.float64]:
    """``spm_dctmtx(N, K)``: the first ``k`` DCT-II basis vectors of length ``n``, unit norm.

    Examples
    --------
    >>> spm_dctmtx(4, 2).round(3)
    array([[ 0.5  ,  0.653],
           [ 0.5  ,  0.271],
           [ 0.5  , -0.271],
           [ 0.5  , -0.653]])
    """
    i = np.arange(n)[:, None]
    order = np.arange(k)[None, :]
    out = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * order / (2 * n))
    out[:, 0] = 1.0 / np.sqrt(n)
    return out


def _high_pass_set(n_scans: int, tr: float, cutoff: float | None) -> NDArray[np.float64]:
    """SPM's ``K.X0``: the DCT cosines with period above ``cutoff`` s, constant excluded."""
    if cutoff is None or np.isinf(cutoff):
        return np.zeros((n_scans, 0))
    cutoff = _check_cutoff(cutoff, tr)
    k = int(np.trunc(2 * (n_scans * tr) / cutoff + 1))
    return spm_dctmtx(n_scans, k)[:, 1:]


def _check_cutoff(cutoff: float, tr: float) -> float:
    value = float(cutoff)
    if not np.isfinite(value) or value <= 0:
        raise DesignError(
            f"high_pass={cutoff!r}: in an SPM convention it is the cut-off period in seconds "
            "(SPM's default 128); use None for no filter"
        )
    if value < 2 * tr:
        hint = f" (did you mean {1 / value:g} s?)" if value < 1 else ""
        raise DesignError(
            f"high_pass={cutoff!r} s is shorter than two scans ({2 * tr:g} s): in an SPM "
            f"convention high_pass is SPM's cut-off period in seconds, not Hz{hint}; "
            "SPM's default is 128"
        )
    return value


def _events_table(events: object, modulators: Sequence[str]) -> pd.DataFrame:
    """Trial types, onsets, durations, heights and modulator columns, checked per value."""
    out, table, _ = timing_table(events, "SPM", modulators)  # type: ignore[arg-type]
    for m in modulators:
        out[f"modulator:{m}"] = pd.to_numeric(table[m], errors="coerce").to_numpy(float)
    return out


def _stimulus(
    onsets: NDArray[np.float64],
    durations: NDArray[np.float64],
    heights: NDArray[np.float64],
    n_bins: int,
    dt: float,
    zero_bin: int,
) -> NDArray[np.float64]:
    """One stimulus function on the microtime grid (``spm_get_ons``), 0-based bins."""
    start = np.maximum(np.round(onsets / dt).astype(np.int64) + zero_bin - 1, 0)
    stop = np.round(durations / dt).astype(np.int64) + start + 1
    steps = np.zeros(n_bins + 96)
    inside = start < steps.size
    np.add.at(steps, start[inside], heights[inside])
    ends = stop < steps.size
    np.add.at(steps, stop[ends], -heights[ends])
    return np.cumsum(steps)[:n_bins]


def _condition_columns(
    rows: pd.DataFrame,
    name: str,
    modulators: Sequence[str],
    basis: NDArray[np.float64],
    grid: tuple[int, int, float, int, int],
    scale: float,
) -> dict[str, NDArray[np.float64]]:
    """One condition's regressors: each basis for the main effect, then each modulator."""
    n_scans, t_bins, dt, zero_bin, onset_bin = grid
    onsets = rows["onset"].to_numpy(float) * scale
    durations = rows["duration"].to_numpy(float) * scale
    inputs = {name: rows["modulation"].to_numpy(float)}
    for m in modulators:
        values = rows[f"modulator:{m}"].to_numpy(float)
        if np.all(np.isfinite(values)) and np.ptp(values) > 0:
            inputs[f"{name}_x_{m}"] = values
    heights = orthogonalize_in_order(np.column_stack(list(inputs.values())))  # per event
    if not np.any(durations):
        heights = heights / dt  # spikes of area 1, as spm_get_ons scales events
    n_bins = n_scans * t_bins + 32
    functions = [_stimulus(onsets, durations, h, n_bins, dt, zero_bin) for h in heights.T]
    sample = np.arange(n_scans) * t_bins + onset_bin + 31
    out: dict[str, NDArray[np.float64]] = {}
    suffixes = ["", "_derivative", "_dispersion"][: basis.shape[1]]
    for label, u in zip(inputs, functions, strict=True):
        for b, suffix in zip(basis.T, suffixes, strict=True):
            out[label + suffix] = np.convolve(u, b)[sample]
    ordered = orthogonalize_in_order(np.column_stack(list(out.values())))
    return dict(zip(out, ordered.T, strict=True))


def spm_design(
    n_scans: int,
    tr: float,
    events: object | None = None,
    *,
    convention: str = "spm12",
    hrf: str = "spm",
    high_pass: float | None = 128.0,
    microtime_resolution: int = 16,
    microtime_onset: int | None = None,
    units: Units = "secs",
    modulators: Sequence[str] = (),
) -> pd.DataFrame:
    """One run's design as SPM builds it (see the module text for every rule).

    Parameters
    ----------
    n_scans : int
        Scans in the run.
    tr : float
        Repetition time (s).
    events : str, pathlib.Path or pandas.DataFrame, optional
        The events table (``onset``, ``duration``, ``trial_type``; optional
        ``modulation`` heights and modulator columns).
    convention : {"spm12", "spm8", "spm5"}, default="spm12"
        The release whose microtime zero and default sampling bin are used.
    hrf : {"spm", "spm + derivative", "spm + derivative + dispersion"}, default="spm"
    high_pass : float or None, default=128
        Cut-off period (s) of the DCT high-pass set; None for none.
    microtime_resolution : int, default=16
        ``fmri_t``: bins per scan.
    microtime_onset : int, optional
        ``fmri_t0``: the bin (1..T) at which each scan is sampled; the release's default.
    units : {"secs", "scans"}, default="secs"
        Units of onsets and durations.
    modulators : sequence of str, default=()
        Events-table columns entered as first-order parametric modulators.

    Returns
    -------
    pandas.DataFrame
        Columns: each condition (in order of first appearance) with its derivatives and
        modulators, then ``drift_1 ..`` (the DCT set) and ``constant``; indexed by the
        sampling times (s).

    Raises
    ------
    DesignError
        For a bad option, events table or modulator column.

    Examples
    --------
    >>> import pandas as pd
    >>> ev = pd.DataFrame({"onset": [10.0, 40.0], "duration": [5.0, 5.0], "trial_type": "go"})
    >>> X = spm_design(50, 2.0, ev, high_pass=64)
    >>> list(X.columns)
    ['go', 'drift_1', 'drift_2', 'drift_3', 'constant']
    >>> float(X.index[1])  # scan 1 sampled at bin 8 of 16: 2 s + 7 * 0.125 s
    2.875
    """
    rule = SPMConvention.of(convention)
    t_bins = int(microtime_resolution)
    if t_bins < 1:
        raise DesignError(f"microtime_resolution must be a positive integer, got {t_bins}")
    onset_bin = rule.default_onset if microtime_onset is None else int(microtime_onset)
    if not 1 <= onset_bin <= t_bins:
        raise DesignError(f"microtime_onset={onset_bin} must be a bin 1..{t_bins} (SPM's fmri_t0)")
    if units not in ("secs", "scans"):
        raise DesignError(f"units={units!r}: use 'secs' or 'scans'")
    dt = tr / t_bins
    columns: dict[str, NDArray[np.float64]] = {}
    if events is not None:
        table = _events_table(events, modulators)
        basis = spm_basis(dt, hrf, microtime_resolution=t_bins)
        grid = (n_scans, t_bins, dt, rule.zero_bin, onset_bin)
        scale = tr if units == "scans" else 1.0
        for name in pd.unique(table["trial_type"].astype(str)):
            rows = table[table["trial_type"].astype(str) == name]
            columns.update(_condition_columns(rows, name, modulators, basis, grid, scale))
    drifts = _high_pass_set(n_scans, tr, high_pass)
    for j in range(drifts.shape[1]):
        columns[f"drift_{j + 1}"] = drifts[:, j]
    columns["constant"] = np.ones(n_scans)
    times = np.arange(n_scans) * tr + rule.sample_offset(onset_bin, dt)
    return pd.DataFrame(columns, index=pd.Index(times))
