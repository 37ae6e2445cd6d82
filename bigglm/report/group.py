"""A one-file HTML report of the group level of one first-level contrast.

What a reader needs to judge the result without opening a viewer: the design and a
summary of the participants, the model and the inference settings, the number of subjects
present at each voxel, and per group contrast its weights, the z map over the MNI152
template (orthogonal slices through the peak and a glass brain, drawn by nilearn's
plotting, whose template ships with nilearn) thresholded by the rule stated beside it, the
cluster tables, the permutation null distribution of the maximum statistic, and links to
every NIfTI written. Images are PNGs embedded as base64 (a single file that opens from a
cluster's scratch space); the page needs no script.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bigglm.io.artefacts import marker, writing
from bigglm.report.html import design_png, mosaic_png

__all__ = ["ContrastSection", "write_group_report"]

_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}th,td{text-align:left;"
    "padding:0.15em 0.8em 0.15em 0}table{border-collapse:collapse;margin:0.5em 0 1em}"
    "tr:nth-child(even){background:#f4f4f4}img{max-width:100%}.rule{color:#444}"
    ".warning{color:#a00}"
)


@dataclass
class ContrastSection:
    """What the report shows of one group contrast."""

    name: str
    weights: Mapping[str, float]
    z_map: Path  # the map drawn: the z map, or the permutation t map
    threshold: float | None = None  # the cut drawn, or None: unthresholded
    stat: str = "z"  # what the map drawn holds
    rule: str = ""  # how the threshold was chosen, in words
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # title -> table
    null_max: np.ndarray | None = None  # the permutation maxima of t, if any
    observed_max: float | None = None
    files: Sequence[Path] = ()


def _png(figure: Any) -> str:
    import base64

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(alt: str, data: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _finite_image(path: Path) -> Any:
    """The map with NaN (outside the analysis) as 0, as nilearn's plotting expects."""
    import nibabel as nib

    image = nib.load(path)
    data = np.nan_to_num(np.asarray(image.dataobj, dtype=np.float32), nan=0.0)  # type: ignore[attr-defined]
    return nib.Nifti1Image(data, image.affine)  # type: ignore[attr-defined]


def _peak_mm(image: Any) -> tuple[float, float, float]:
    data = np.abs(np.asarray(image.dataobj))
    ijk = np.unravel_index(int(np.argmax(data)), data.shape)
    x, y, z = (image.affine @ np.array([*ijk, 1.0]))[:3]
    return float(x), float(y), float(z)


def stat_map_pngs(z_map: Path, threshold: float | None, title: str) -> tuple[str, str]:
    """The z map over the MNI152 template, orthogonal slices through its peak, and as a
    glass brain (nilearn's plotting), both base64 PNGs."""
    from matplotlib.figure import Figure
    from nilearn import plotting

    image = _finite_image(z_map)
    cut = None if threshold is None or not np.isfinite(threshold) else float(threshold)
    vmax = max(float(np.abs(np.asarray(image.dataobj)).max()), (cut or 0.0) + 1.0)
    slices = Figure(figsize=(10, 3.4))
    plotting.plot_stat_map(
        image,
        threshold=cut,
        cut_coords=_peak_mm(image),
        display_mode="ortho",
        figure=slices,
        colorbar=True,
        vmax=vmax,
        title=title,
    )
    glass = Figure(figsize=(10, 3.0))
    plotting.plot_glass_brain(
        image,
        threshold=cut,
        display_mode="lyrz",
        figure=glass,
        colorbar=True,
        plot_abs=False,
        vmax=vmax,
    )
    return _png(slices), _png(glass)


def null_png(null_max: np.ndarray, observed: float | None, title: str) -> str:
    """A histogram of the permutation maxima, with the observed maximum and the 95th
    percentile (the FWE 0.05 threshold) marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3))
    axes = figure.add_subplot()
    axes.hist(null_max, bins=40, color="#888")
    cut = float(np.quantile(null_max, 0.95))
    axes.axvline(cut, color="k", linestyle="--", label=f"95th percentile {cut:.2f}")
    if observed is not None and np.isfinite(observed):
        axes.axvline(observed, color="C3", label=f"observed max {observed:.2f}")
    axes.set_xlabel("maximum statistic over the brain")
    axes.set_ylabel("rearrangements")
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _png(figure)


def _table(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    return shown.to_html(index=False, border=0, escape=True, na_rep="")


def _facts(rows: Sequence[tuple[str, str]]) -> str:
    esc = html.escape
    return (
        "<table>"
        + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _participants(design: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "column": [str(c) for c in design.columns],
            "mean": design.mean().to_numpy(),
            "SD": design.std(ddof=1).to_numpy() if len(design) > 1 else np.nan,
            "min": design.min().to_numpy(),
            "max": design.max().to_numpy(),
        }
    )


def _links(files: Sequence[Path], folder: Path) -> str:
    items = []
    for path in files:
        target = os.path.relpath(path, folder)
        items.append(f'<li><a href="{html.escape(target)}">{html.escape(path.name)}</a></li>')
    return "<ul>" + "".join(items) + "</ul>"


def _contrast_html(section: ContrastSection, folder: Path) -> str:
    esc = html.escape
    weights = pd.DataFrame(
        {"column": list(section.weights), "weight": list(section.weights.values())}
    )
    parts = [f"<h2>Contrast {esc(section.name)}</h2>"]
    parts += [_table(weights)] if section.weights else []
    slices, glass = stat_map_pngs(
        section.z_map, section.threshold, f"{section.name}: {section.stat}"
    )
    cut = (
        "none (unthresholded)"
        if section.threshold is None
        else f"|{section.stat}| ≥ {section.threshold:.3f}"
    )
    parts.append(f"<p class='rule'>Threshold: {esc(cut)}. {esc(section.rule)}</p>")
    parts += [_img(f"{section.stat} map of {section.name} at its peak", slices)]
    parts += [_img(f"glass brain of {section.name}", glass)]
    if section.null_max is not None:
        title = f"{section.name}: null distribution of max t"
        parts.append(_img(title, null_png(section.null_max, section.observed_max, title)))
    for title, table in section.tables.items():
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(_table(table) if len(table) else "<p>No cluster above the threshold.</p>")
    parts.append("<h3>Files</h3>" + _links(section.files, folder))
    return "".join(parts)


def write_group_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    design: pd.DataFrame,
    facts: Sequence[tuple[str, str]],
    n_map: np.ndarray,
    contrasts: Sequence[ContrastSection],
) -> Path:
    """Write the HTML report of one first-level contrast's group level, atomically.

    Parameters
    ----------
    path : path
        The ``.html`` file (its folder holds the maps it links to).
    title : str
        What was taken to the group level (``contrast-facesMinusHouses``).
    design : pandas.DataFrame
        The group design (subjects x columns).
    facts : sequence of (str, str)
        Rows of the summary table (subjects, model, inference settings).
    n_map : numpy.ndarray
        Subjects present per voxel, as a 3D volume (NaN outside the analysis).
    contrasts : sequence of ContrastSection

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    esc = html.escape
    n_scale = (0.0, float(np.nanmax(n_map)), "viridis", "subjects")
    body = [
        f"<h1>bigglm group level: {esc(title)}</h1>",
        _facts(facts),
        "<h2>Design</h2>",
        _img("group design matrix", design_png(design, "group design", rows="subject")),
        "<h3>Design columns over the subjects</h3>",
        _table(_participants(design)),
        "<h2>Subjects present per voxel</h2>",
        _img("subjects present per voxel", mosaic_png(n_map, "n (subjects)", scale=n_scale)),
        *(_contrast_html(section, path.parent) for section in contrasts),
    ]
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='generator' content='{marker('report')}'><title>{esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    with writing(path, "report", overwrite=True) as stage:  # only a report bigglm wrote
        stage.write_text(page, encoding="utf-8")
    return path
