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

__all__ = ["design_png", "matrix_png", "mosaic_png", "write_html_report"]

#: z maps are drawn on a symmetric colour scale clipped at this value.
Z_LIMIT = 8.0


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def design_png(design: pd.DataFrame, title: str, *, rows: str = "scan") -> str:
    """A design matrix drawn as an image (columns scaled to their largest magnitude).

    Parameters
    ----------
    design : pandas.DataFrame
        Scans x regressors.
    title : str
        Shown above the image.
    rows : str
        What a row is (the axis label): ``scan``, or ``subject`` for a group design.

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
    axes.set_ylabel(rows)
    axes.set_title(title)
    return _png(figure)


def mosaic_png(
    z: np.ndarray,
    title: str,
    *,
    n_slices: int = 12,
    scale: tuple[float, float, str, str] | None = None,
) -> str:
    """Axial slices of a z map (NaN outside the mask) on a symmetric colour scale.

    Parameters
    ----------
    z : numpy.ndarray
        A 3D z map (or any 3D map, with ``scale``).
    title : str
        Shown above the slices.
    n_slices : int
        Evenly spaced axial slices through the voxels that have a value.
    scale : (vmin, vmax, colormap, label), optional
        Another colour scale (default: z from -8 to 8, ``RdBu_r``).

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
    vmin, vmax, cmap, label = scale or (-Z_LIMIT, Z_LIMIT, "RdBu_r", "z")
    figure = Figure(figsize=(2.0 * columns, 2.0 * rows + 0.4))
    for index, k in enumerate(picks.astype(int)):
        axes = figure.add_subplot(rows, columns, index + 1)
        image = axes.imshow(
            np.rot90(z[:, :, k]), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
        )
        axes.set_axis_off()
        axes.set_title(f"k={k}", fontsize=8)
    figure.suptitle(title)
    figure.colorbar(image, ax=figure.axes, shrink=0.6, label=label)
    return _png(figure)


#: A regressor whose variance inflation factor exceeds this is flagged as collinear.
VIF_WARNING = 10.0


def matrix_png(
    values: pd.DataFrame, title: str, *, cmap: str = "RdBu_r", limit: float | None = None
) -> str:
    """A small labelled matrix (contrast weights, regressor correlations) as an image."""
    from matplotlib.figure import Figure

    data = values.to_numpy(dtype=np.float64)
    bound = limit or max(float(np.nanmax(np.abs(data))) if data.size else 1.0, 1e-12)
    figure = Figure(
        figsize=(max(3.0, 0.35 * data.shape[1] + 1.5), max(1.2, 0.35 * data.shape[0] + 1.0))
    )
    axes = figure.add_subplot()
    image = axes.imshow(data, cmap=cmap, vmin=-bound, vmax=bound, interpolation="nearest")
    axes.set_xticks(range(data.shape[1]), [str(c) for c in values.columns], rotation=90)
    axes.set_yticks(range(data.shape[0]), [str(r) for r in values.index])
    axes.set_title(title)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _png(figure)


def mask_png(mask: Any, title: str) -> str:
    """The outline of an analysis mask (a NIfTI image) over the MNI152 template, axial
    slices, by nilearn's plotting."""
    from matplotlib.figure import Figure
    from nilearn import plotting

    figure = Figure(figsize=(10, 2.2))
    plotting.plot_roi(
        mask, display_mode="z", cut_coords=7, view_type="contours", figure=figure, title=title
    )
    return _png(figure)


def _diagnostics_html(name: str, design: pd.DataFrame) -> str:
    """Regressor correlations and VIFs of one run's design, with a collinearity warning."""
    from bigglm.design.diagnostics import correlation_matrix, variance_inflation_factors
    from bigglm.report.group import _table

    esc = html.escape
    varying = design.loc[:, design.std() > 0]
    vif = variance_inflation_factors(design)
    flagged = [str(c) for c, v in vif.items() if v > VIF_WARNING and c in varying.columns]
    parts = [
        f'<img alt="regressor correlations {esc(name)}" src="data:image/png;base64,'
        f'{matrix_png(correlation_matrix(varying), f"{name}: correlations", limit=1.0)}">',
        _table(pd.DataFrame({"regressor": [str(c) for c in vif.index], "VIF": vif.to_numpy()})),
    ]
    if flagged:
        parts.insert(
            0,
            f"<p class='warning'>Collinearity: VIF above {VIF_WARNING:g} for "
            f"{esc(', '.join(flagged))}; their effects are estimated with inflated variance.</p>",
        )
    return "".join(parts)


def write_html_report(
    path: str | Path,
    *,
    title: str,
    designs: Mapping[str, pd.DataFrame],
    z_maps: Mapping[str, np.ndarray],
    steps: Mapping[str, Mapping[str, Any]],
    facts: Sequence[tuple[str, str]] = (),
    model: Sequence[tuple[str, str]] = (),
    contrast_weights: Mapping[str, pd.DataFrame] | None = None,
    stat_maps: Sequence[Any] = (),
    mask: Any = None,
    surface_maps: Sequence[Any] = (),
    surface_note: str = "",
) -> Path:
    """Write the HTML report of one unit, atomically.

    Parameters
    ----------
    path : str or Path
        The ``.html`` file.
    title : str
        Page title (the unit's name).
    designs : Mapping
        Run name -> design matrix (drawn, with its regressor correlations and VIFs).
    z_maps : Mapping
        Contrast name -> 3D z map, drawn as axial mosaics when ``stat_maps`` is empty.
    steps : Mapping
        Step -> ``{"status", "seconds"}`` (as in the provenance JSON).
    facts : sequence of (str, str)
        Extra rows for the summary table (runs, voxels, noise model, ...).
    model : sequence of (str, str)
        The model's parameters (HRF, drift, high-pass, noise model, TR, slice timing).
    contrast_weights : Mapping, optional
        Run name -> contrast matrix (rows: contrast rows, columns: the design's), drawn.
    stat_maps : sequence of bigglm.report.group.ContrastSection
        Per contrast: the z map over the MNI template at its peak and as a glass brain,
        the threshold rule, the cluster table and the files.
    mask : nibabel image, optional
        The analysis mask, drawn as an outline over the MNI template.
    surface_maps : sequence of bigglm.report.surface.SurfaceSection
        Per contrast of a GIFTI run on fsaverage5: the z map on the inflated mesh, both
        hemispheres, lateral and medial views, with the threshold rule and the files.
    surface_note : str
        One line in place of surface figures (maps on a mesh nilearn does not ship).

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
    from bigglm.report.group import _STYLE, _contrast_html, _facts
    from bigglm.report.surface import surface_html

    esc = html.escape
    rows = [
        *facts,
        *((f"step {k}", f"{v['status']} ({v['seconds']:.2f} s)") for k, v in steps.items()),
    ]
    sections = [f"<h1>bigglm first level: {esc(title)}</h1>", _facts(rows)]
    if model:
        sections += ["<h2>Model</h2>", _facts(model)]
    if mask is not None:
        outline = mask_png(mask, "analysis mask")
        sections += [
            f'<h2>Mask</h2><img alt="analysis mask" src="data:image/png;base64,{outline}">'
        ]
    sections.append("<h2>Design matrices</h2>")
    for name, design in designs.items():
        sections.append(
            f'<h3>{esc(name)}</h3><img alt="design {esc(name)}" '
            f'src="data:image/png;base64,{design_png(design, name)}">'
        )
        weights = (contrast_weights or {}).get(name)
        if weights is not None and len(weights):
            sections.append(
                f'<img alt="contrasts {esc(name)}" src="data:image/png;base64,'
                f'{matrix_png(weights, f"{name}: contrasts")}">'
            )
        sections.append(_diagnostics_html(name, design))
    sections.append("<h2>Contrasts</h2>")
    if surface_note:
        sections.append(f"<p class='note'>{esc(surface_note)}</p>")
    if surface_maps:
        sections += [surface_html(section, Path(path).parent) for section in surface_maps]
    elif stat_maps:
        sections += [_contrast_html(section, Path(path).parent) for section in stat_maps]
    else:
        sections += [
            f'<h3>{esc(n)}</h3><img alt="z {esc(n)}" '
            f'src="data:image/png;base64,{mosaic_png(z, n)}">'
            for n, z in z_maps.items()
        ]
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='generator' content='{marker('report')}'><title>{esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>\n"
    )
    with writing(path, "report", overwrite=True) as stage:  # only a report bigglm wrote
        stage.write_text(page, encoding="utf-8")
    return Path(path)
