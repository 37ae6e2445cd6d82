"""Confound regressors: fMRIPrep ``*_desc-confounds_timeseries.tsv`` or a DataFrame.

fMRIPrep writes ``n/a`` in the first row(s) of columns that need a previous volume:
temporal derivatives (``*_derivative1*``), ``framewise_displacement``, ``dvars`` and
``std_dvars``. bigglm fills these leading gaps (``fill_na``):

* ``"mean"`` (default): the column's mean over the other rows. This neither adds a
  spike at volume 0 to columns that are not centred (``dvars`` is ~20-40) nor moves
  the column's mean; for centred columns (derivatives) it is ~0;
* ``"zero"``: 0, the usual "no motion before the first volume" reading;
* ``"next"``: the first valid value, as nilearn's ``load_confounds`` does.

Missing values anywhere else are an error: they do not come from fMRIPrep's
conventions and filling them would hide a broken file.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from bigglm.design.events import read_table
from bigglm.exceptions import DesignError

__all__ = ["FillNA", "load_confounds", "scrubbing_regressors", "select_columns"]

#: How leading missing values of a confound column are filled.
FillNA = Literal["mean", "zero", "next"]


def select_columns(available: Sequence[str], patterns: Sequence[str], label: str) -> list[str]:
    """Columns matching names or glob patterns, in pattern order, without repeats.

    Parameters
    ----------
    available : sequence of str
        The table's columns, in file order.
    patterns : sequence of str
        Exact names or shell-style patterns (``"a_comp_cor_*"``, ``"trans_?"``).
    label : str
        Where the columns come from, for the error message.

    Returns
    -------
    list of str
        Matching columns; each pattern's matches in file order.

    Raises
    ------
    DesignError
        If a pattern matches no column.

    Examples
    --------
    >>> select_columns(["trans_x", "rot_x", "a_comp_cor_00"], ["a_comp_cor_*", "trans_x"], "t")
    ['a_comp_cor_00', 'trans_x']
    """
    chosen: list[str] = []
    for pattern in patterns:
        hits = [c for c in available if fnmatch.fnmatchcase(c, pattern)]
        if not hits:
            raise DesignError(
                f"{label} has no column matching {pattern!r}; available columns start "
                f"with {list(available)[:8]}"
            )
        chosen.extend(c for c in hits if c not in chosen)
    return chosen


def _fill_leading(values: pd.Series, how: FillNA, label: str) -> pd.Series:
    """Fill the leading run of missing values; any other gap is an error."""
    missing = values.isna().to_numpy()
    if not missing.any():
        return values
    if missing.all():
        raise DesignError(f"{label}: column {values.name!r} has no values; drop it")
    n_leading = int(np.argmax(~missing))
    later = np.flatnonzero(missing[n_leading:])
    if later.size:
        raise DesignError(
            f"{label}: column {values.name!r} is missing a value in row "
            f"{n_leading + int(later[0])}; only the first rows may be n/a"
        )
    fill = {"mean": values.mean(), "zero": 0.0, "next": values.iloc[n_leading]}[how]
    return values.fillna(fill)


def load_confounds(
    source: str | Path | pd.DataFrame,
    columns: Sequence[str] | None = None,
    *,
    n_scans: int | None = None,
    fill_na: FillNA = "mean",
) -> pd.DataFrame:
    """Read confound regressors, select columns, and fill fMRIPrep's leading ``n/a``.

    Parameters
    ----------
    source : str, pathlib.Path or pandas.DataFrame
        An fMRIPrep ``*_desc-confounds_timeseries.tsv`` (or any TSV/CSV with a header)
        or a DataFrame, one row per volume.
    columns : sequence of str, optional
        Names or glob patterns (``["trans_*", "rot_*", "a_comp_cor_0[0-4]"]``); all
        columns by default.
    n_scans : int, optional
        Number of volumes of the run; a table of another length is an error.
    fill_na : {"mean", "zero", "next"}, default="mean"
        How to fill leading missing values (see the module notes).

    Returns
    -------
    pandas.DataFrame
        Float columns, with a default integer index.

    Raises
    ------
    DesignError
        For a missing file, an unmatched pattern, a non-numeric column, a gap that is
        not at the start, or a length that differs from ``n_scans``.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"trans_x": [0.0, 0.1, 0.2], "trans_x_derivative1": [None, 0.1, 0.1]})
    >>> load_confounds(table, ["trans_*"], fill_na="zero")
       trans_x  trans_x_derivative1
    0      0.0                  0.0
    1      0.1                  0.1
    2      0.2                  0.1
    """
    table, label = read_table(source, "confounds")
    if n_scans is not None and len(table) != n_scans:
        raise DesignError(
            f"{label} has {len(table)} rows but the run has {n_scans} volumes; "
            "use the confounds of the same run (and drop the same dummy scans)"
        )
    names = (
        list(table.columns)
        if columns is None
        else select_columns([str(c) for c in table.columns], columns, label)
    )
    out = {}
    for name in names:
        values = pd.to_numeric(table[name], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() & table[name].notna().to_numpy())
        if bad.size:
            raise DesignError(
                f"{label}: column {name!r} has a non-numeric value "
                f"{table[name].iloc[bad[0]]!r} in row {int(bad[0])}"
            )
        out[str(name)] = _fill_leading(values.astype(np.float64), fill_na, label)
    return pd.DataFrame(out).reset_index(drop=True)


def scrubbing_regressors(
    sample_mask: ArrayLike, n_scans: int, *, prefix: str = "scrub"
) -> pd.DataFrame:
    """One spike column per censored volume (1 at that volume, 0 elsewhere).

    Adding these columns to a design removes the censored volumes from the fit of
    every other regressor, exactly as deleting those rows would (nilearn's
    ``sample_mask``), while keeping one row per volume.

    Parameters
    ----------
    sample_mask : array_like
        Either a boolean array of length ``n_scans`` (True = keep) or the integer
        indices of the volumes to keep (nilearn's convention).
    n_scans : int
        Number of volumes.
    prefix : str, default="scrub"
        Column names are ``f"{prefix}_{volume}"``, volumes zero-padded.

    Returns
    -------
    pandas.DataFrame
        Shape ``(n_scans, n_censored)``.

    Raises
    ------
    DesignError
        If the mask has the wrong length or indices out of range.

    Examples
    --------
    >>> scrubbing_regressors([0, 1, 3], 4)
       scrub_2
    0      0.0
    1      0.0
    2      1.0
    3      0.0
    """
    keep = _keep_mask(np.asarray(sample_mask), n_scans)
    censored = np.flatnonzero(~keep)
    width = len(str(n_scans - 1))
    spikes = np.zeros((n_scans, censored.size))
    spikes[censored, np.arange(censored.size)] = 1.0
    names = [f"{prefix}_{v:0{width}d}" for v in censored]
    return pd.DataFrame(spikes, columns=names)


def _keep_mask(mask: NDArray[np.generic], n_scans: int) -> NDArray[np.bool_]:
    """A boolean keep-mask from a boolean mask or keep-indices."""
    if mask.dtype == bool:
        if mask.shape != (n_scans,):
            raise DesignError(
                f"boolean sample_mask has shape {mask.shape} but the run has {n_scans} volumes"
            )
        return mask.astype(bool)
    indices = mask.astype(int).ravel()
    if indices.size and (indices.min() < 0 or indices.max() >= n_scans):
        raise DesignError(
            f"sample_mask indices must be in [0, {n_scans - 1}], got {indices.min()}.."
            f"{indices.max()}"
        )
    keep = np.zeros(n_scans, dtype=bool)
    keep[indices] = True
    return keep
