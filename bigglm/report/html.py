"""A one-file HTML report per unit: the designs, a z-map mosaic per contrast, the steps.

Images are PNGs drawn with matplotlib's Agg backend and embedded as base64, so the report
is a single file that can be mailed or opened from a cluster's scratch space.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bigglm.io.artefacts import marker, writing

__all__ = ["design_png", "mosaic_png", "write_html_report"]

#: z maps are drawn on a symmetric colour scale clipped at this value.
Z_LIMIT = 8.0


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def design_png(design: pd.DataFrame, title: str) -> str:
    """A design matrix drawn as an image (columns scaled to their largest magnitude).

    Parameters
    ----------
    design : pandas.DataFrame
        Scans x regressors.
    title : str
        Shown above the image.

    Returns
    -------
    str
        The PNG, base64-encoded.

    Examples
    --------
    >>> frame = pd.DataFrame({"a": np.r_[np.zeros(5), np.ones(5)], "constant": 1.0})
    >>> design_png(frame, "run 1")[:8]
    'iVBORw0K'
    """
    from matplotlib.figure import Figure

    from bigglm.design.plot import scaled_columns

    figure = Figure(figsize=(max(3.0, 0.3 * design.shape[1]), 4.0))
    axes = figure.add_subplot()
    axes.imshow(
        scaled_columns(design), aspect="auto", cmap="gray", interpolation="nearest", vmin=-1, vmax=1
    )
    axes.set_xticks(range(design.shape[1]), [str(c) for c in design.columns], rotation=90)
    axes.set_ylabel("scan")
    axes.set_title(title)
    return _png(figure)


def mosaic_png(z: np.ndarray, title: str, *, n_slices: int = 12) -> str:
    """Axial slices of a z map (NaN outside the mask) on a symmetric colour scale.

    Parameters
    ----------
    z : numpy.ndarray
        A 3D z map.
    title : str
        Shown above the slices.
    n_slices : int
        Evenly spaced axial slices through the voxels that have a value.

    Returns
    -------
    str
        The PNG, base64-encoded.

    Examples
    --------
    >>> z = np.full((4, 4, 6), np.nan); z[1:3, 1:3, 1:5] = 2.0
    >>> mosaic_png(z, "a", n_slices=2)[:8]
    'iVBORw0K'
    """
    from matplotlib.figure import Figure

    finite = np.isfinite(z)
    levels = np.flatnonzero(finite.any(axis=(0, 1)))
    if levels.size == 0:
        levels = np.arange(z.shape[2])
    picks = np.unique(np.linspace(levels[0], levels[-1], min(n_slices, levels.size)).round())
    columns = min(6, picks.size)
    rows = int(np.ceil(picks.size / columns))
    figure = Figure(figsize=(2.0 * columns, 2.0 * rows + 0.4))
    for index, k in enumerate(picks.astype(int)):
        axes = figure.add_subplot(rows, columns, index + 1)
        image = axes.imshow(
            np.rot90(z[:, :, k]),
            cmap="RdBu_r",
            vmin=-Z_LIMIT,
            vmax=Z_LIMIT,
            interpolation="nearest",
        )
        axes.set_axis_off()
        axes.set_title(f"k={k}", fontsize=8)
    figure.suptitle(title)
    figure.colorbar(image, ax=figure.axes, shrink=0.6, label="z")
    return _png(figure)


def write_html_report(
    path: str | Path,
    *,
    title: str,
    designs: Mapping[str, pd.DataFrame],
    z_maps: Mapping[str, np.ndarray],
    steps: Mapping[str, Mapping[str, Any]],
    facts: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the HTML report of one unit, atomically.

    Parameters
    ----------
    path : str or Path
        The ``.html`` file.
    title : str
        Page title (the unit's name).
    designs : Mapping
        Run name -> design matrix.
    z_maps : Mapping
        Contrast name -> 3D z map.
    steps : Mapping
        Step -> ``{"status", "seconds"}`` (as in the provenance JSON).
    facts : sequence of (str, str)
        Extra rows for the summary table (runs, voxels, noise model, ...).

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "r.html"
    >>> frame = pd.DataFrame({"a": np.r_[np.zeros(5), np.ones(5)], "constant": 1.0})
    >>> z = np.full((3, 3, 3), np.nan); z[1, 1, 1] = 4.0
    >>> _ = write_html_report(out, title="sub-01", designs={"run-1": frame}, z_maps={"a": z},
    ...                       steps={"fit": {"status": "ran", "seconds": 1.0}})
    >>> "<h2>Contrasts</h2>" in out.read_text()
    True
    """
    esc = html.escape
    rows = [
        *facts,
        *((f"step {k}", f"{v['status']} ({v['seconds']:.2f} s)") for k, v in steps.items()),
    ]
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
    images = [
        f'<img alt="design {esc(n)}" src="data:image/png;base64,{design_png(d, n)}">'
        for n, d in designs.items()
    ]
    maps = [
        f'<h3>{esc(n)}</h3><img alt="z {esc(n)}" src="data:image/png;base64,{mosaic_png(z, n)}">'
        for n, z in z_maps.items()
    ]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<meta name='generator' content='{marker('report')}'><title>{esc(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>bigglm first level: {esc(title)}</h1><table>{table}</table>"
        f"<h2>Design matrices</h2>{''.join(images)}<h2>Contrasts</h2>{''.join(maps)}"
        "</body></html>\n"
    )
    with writing(path, "report", overwrite=True) as stage:  # only a report bigglm wrote
        stage.write_text(page)
    return Path(path)
