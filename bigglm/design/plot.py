"""Figures of a design, written as PNG files (matplotlib's Agg backend, no pyplot).

Each function writes atomically (:func:`bigglm.io.artefacts.writing`) and returns the
path, for the report to embed. The PNG's ``Software`` text says ``bigglm figure``, so a
figure bigglm wrote is replaced by the next one, and any other file at the path is
refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bigglm.design.diagnostics import correlation_matrix
from bigglm.design.events import HRFModel
from bigglm.design.hemodynamic import hrf_basis

__all__ = ["plot_correlation", "plot_design", "plot_hrf", "scaled_columns"]


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Write a figure as PNG atomically and return its path."""
    from bigglm.io.artefacts import marker, writing

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    with writing(target, "figure", overwrite=True, suffix=".png") as stage:
        figure.savefig(
            stage,
            format="png",
            dpi=100,
            bbox_inches="tight",
            metadata={"Software": marker("figure")},
        )
    return target


def scaled_columns(X: pd.DataFrame) -> np.ndarray:
    """A design's values with each column divided by its largest magnitude, for drawing.

    All-zero columns stay zero.

    Parameters
    ----------
    X : pandas.DataFrame
        Design.

    Returns
    -------
    numpy.ndarray
        Float64, shape of ``X``, values in [-1, 1].

    Examples
    --------
    >>> import pandas as pd
    >>> scaled_columns(pd.DataFrame({"a": [0.0, -4.0, 2.0], "b": 0.0}))
    array([[ 0. ,  0. ],
           [-1. ,  0. ],
           [ 0.5,  0. ]])
    """
    values = X.to_numpy(dtype=np.float64)
    peak = np.abs(values).max(axis=0)
    return np.asarray(values / np.where(peak > 0, peak, 1.0))


def plot_design(X: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """The design as a grey-scale image: one row per volume, one column per regressor.

    Each column is scaled by its largest magnitude so that small regressors stay
    visible (as nilearn's ``plot_design_matrix`` does).

    Parameters
    ----------
    X : pandas.DataFrame
        Design.
    path : str or os.PathLike
        Output PNG.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import pandas as pd, tempfile, pathlib
    >>> X = pd.DataFrame({"a": [0.0, 1.0, 0.5], "constant": 1.0})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     plot_design(X, pathlib.Path(d) / "design.png").stat().st_size > 0
    True
    """
    figure = Figure(figsize=(1.0 + 0.35 * X.shape[1], 5.0))
    axes = figure.add_subplot()
    axes.imshow(scaled_columns(X), aspect="auto", cmap="gray", interpolation="nearest")
    axes.set_xticks(range(X.shape[1]), [str(c) for c in X.columns], rotation=60, ha="right")
    axes.set_ylabel("volume")
    axes.set_title("Design matrix")
    return _save(figure, path)


def plot_hrf(
    model: HRFModel,
    tr: float,
    path: str | os.PathLike[str],
    *,
    oversampling: int = 50,
) -> Path:
    """Each kernel of an HRF model against time (s).

    Parameters
    ----------
    model : str, callable or sequence of callables
        An ``hrf=`` model of :func:`bigglm.design.make_design` (not ``"fir"``).
    tr : float
        Repetition time (s).
    path : str or os.PathLike
        Output PNG.
    oversampling : int, default=50
        Samples per TR.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     plot_hrf("glover + derivative", 2.0, pathlib.Path(d) / "hrf.png").exists()
    True
    """
    kernels = hrf_basis(model, tr, oversampling)
    labels = ["HRF", "time derivative", "dispersion derivative"]
    figure = Figure(figsize=(6.0, 3.5))
    axes = figure.add_subplot()
    for k, kernel in enumerate(kernels):
        times = np.arange(kernel.size) * tr / oversampling
        axes.plot(times, kernel, label=labels[k] if k < len(labels) else f"kernel {k}")
    axes.axhline(0.0, color="0.6", linewidth=0.8)
    axes.set_xlabel("time after event (s)")
    axes.set_ylabel("kernel value")
    axes.set_title(f"HRF: {getattr(model, '__name__', model)}")
    axes.legend(frameon=False)
    return _save(figure, path)


def plot_correlation(X: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """The regressors' correlation matrix, from -1 (blue) to 1 (red).

    Constant columns (undefined correlation) are left out.

    Parameters
    ----------
    X : pandas.DataFrame
        Design.
    path : str or os.PathLike
        Output PNG.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import pandas as pd, tempfile, pathlib
    >>> X = pd.DataFrame({"a": [0.0, 1.0, 0.5], "b": [1.0, 0.0, 0.2], "constant": 1.0})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     plot_correlation(X, pathlib.Path(d) / "corr.png").exists()
    True
    """
    varying = X.loc[:, X.std(axis=0) > 0]
    corr = correlation_matrix(varying)
    size = 1.5 + 0.4 * corr.shape[0]
    figure = Figure(figsize=(size + 1.0, size))
    axes = figure.add_subplot()
    image = axes.imshow(corr.to_numpy(), vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    names = [str(c) for c in corr.columns]
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_title("Regressor correlations")
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _save(figure, path)
