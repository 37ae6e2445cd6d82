"""Surface contrast maps in the first-level report: z on nilearn's fsaverage5 meshes.

nilearn ships fsaverage5 (10242 vertices per hemisphere) with its package, so a GIFTI
map on it is drawn on the inflated mesh over sulcal depth, both hemispheres, lateral and
medial views, without a download. Maps on other meshes (fsLR, or any other vertex
count) get a line saying why no figure is drawn.
"""

from __future__ import annotations

import html
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["FSAVERAGE5_VERTICES", "SurfaceSection", "surface_mesh", "surface_png"]

#: Vertices per hemisphere of fsaverage5, the one mesh the report draws on.
FSAVERAGE5_VERTICES = 10242

_HEMIS = {"L": "left", "R": "right"}


@dataclass
class SurfaceSection:
    """What the report shows of one contrast's surface z map."""

    name: str
    z_maps: Mapping[str, Path]  # hemisphere ("L", "R") -> GIFTI z map
    threshold: float
    rule: str = ""  # how the threshold was chosen, in words
    files: Sequence[Path] = field(default_factory=tuple)


def surface_mesh(hemispheres: Mapping[str, int]) -> str | None:
    """The nilearn mesh a store's vertices lie on, or None when nilearn ships none.

    Examples
    --------
    >>> surface_mesh({"L": 10242, "R": 10242}), surface_mesh({"L": 180, "R": 150})
    ('fsaverage5', None)
    """
    counts = {str(h): int(n) for h, n in hemispheres.items()}
    if counts and set(counts) <= set(_HEMIS) and set(counts.values()) == {FSAVERAGE5_VERTICES}:
        return "fsaverage5"
    return None


def _gifti_values(path: Path) -> np.ndarray:
    """A GIFTI map's values, NaN (vertices left out) as 0, as nilearn's plotting expects."""
    import nibabel as nib

    image = nib.load(path)
    if not isinstance(image, nib.GiftiImage):
        raise TypeError(f"{path} is not a GIFTI image; the surface report draws GIFTI maps")
    values = np.concatenate([np.ravel(d.data) for d in image.darrays]).astype(np.float64)
    return np.where(np.isfinite(values), values, 0.0)


def surface_png(z: Mapping[str, np.ndarray], threshold: float, title: str) -> str:
    """A base64 PNG of per-hemisphere z values on fsaverage5's inflated mesh: a row per
    hemisphere, lateral and medial views, ``|z| < threshold`` not drawn.

    Parameters
    ----------
    z : Mapping
        Hemisphere (``"L"``, ``"R"``) -> ``(10242,)`` z values.
    threshold : float
        The cut: vertices below it in absolute value show the sulcal background.
    title : str
        Drawn above the figure.

    Returns
    -------
    str
        The PNG, base64-encoded.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting
    from nilearn.datasets import load_fsaverage, load_fsaverage_data

    from bigglm.report.html import Z_LIMIT, _png

    mesh = load_fsaverage("fsaverage5")["inflated"]
    # nilearn 0.12 and 0.13 darken the background by default and warn about it (None is
    # the new behaviour); 0.14 removed the parameter
    options = (
        {"darkness": None}
        if "darkness" in inspect.signature(plotting.plot_surf_stat_map).parameters
        else {}
    )
    sulcal = load_fsaverage_data(mesh="fsaverage5", mesh_type="inflated", data_type="sulcal")
    figure, axes = plt.subplots(
        len(z), 2, subplot_kw={"projection": "3d"}, figsize=(7, 3.2 * len(z)), squeeze=False
    )
    try:
        for row, (hemi, values) in enumerate(z.items()):
            side = _HEMIS[hemi]
            for col, view in enumerate(("lateral", "medial")):
                plotting.plot_surf_stat_map(
                    mesh.parts[side],
                    np.asarray(values, dtype=np.float64),
                    bg_map=np.asarray(sulcal.data.parts[side]),
                    hemi=side,
                    view=view,
                    threshold=threshold,
                    vmin=-Z_LIMIT,
                    vmax=Z_LIMIT,
                    colorbar=col == 1,
                    title=f"{side} {view}",
                    axes=axes[row, col],
                    figure=figure,
                    **options,
                )
        figure.suptitle(title)
        return _png(figure)
    finally:
        plt.close(figure)


def surface_html(section: SurfaceSection, folder: Path) -> str:
    """One contrast's surface section: threshold rule, figure, files."""
    from bigglm.report.group import _img, _links

    esc = html.escape
    z = {hemi: _gifti_values(path) for hemi, path in section.z_maps.items()}
    title = f"{section.name}: z on fsaverage5 (inflated)"
    return "".join(
        [
            f"<h2>Contrast {esc(section.name)}</h2>",
            f"<p class='rule'>Threshold: |z| ≥ {section.threshold:.3f}. {esc(section.rule)}</p>",
            _img(f"surface z map of {section.name}", surface_png(z, section.threshold, title)),
            "<h3>Files</h3>" + _links(section.files, folder),
        ]
    )
