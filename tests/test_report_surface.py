"""The first-level report of surface studies: z maps drawn on nilearn's fsaverage5.

A one-run BIDS derivatives folder is written with nibabel, as in
``tests/test_pipeline_surface.py``: a GIFTI series per hemisphere with a constant medial
wall. On fsaverage5's vertex count (10242 per hemisphere) the report must hold, per
contrast, a PNG that decodes to a non-blank image of the z map on the mesh; on any other
vertex count, one line saying that nilearn ships no such mesh, and no surface figure.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bigglm.config import parse_config
from bigglm.design import make_run_design
from bigglm.pipeline import run_analysis

pytestmark = pytest.mark.cluster

TR = 2.0
N_SCANS = 24
CONTRASTS = {"a": "a", "a_minus_b": "a - b"}
STRUCTURES = {"L": "CortexLeft", "R": "CortexRight"}


def write_dataset(root: Path, n_vertices: int) -> Path:
    """One run, a GIFTI series per hemisphere of ``n_vertices`` (the first 200: the wall)."""
    rng = np.random.default_rng(17)
    func, raw = root / "derivatives/sub-01/func", root / "raw/sub-01/func"
    func.mkdir(parents=True)
    raw.mkdir(parents=True)
    onsets = np.arange(0.0, N_SCANS * TR, 12.0)
    events = pd.DataFrame(
        {"onset": onsets, "duration": 6.0, "trial_type": ["a", "b"] * (len(onsets) // 2)}
    )
    events.to_csv(raw / "sub-01_task-x_events.tsv", sep="\t", index=False)
    x = make_run_design(N_SCANS, TR, events=raw / "sub-01_task-x_events.tsv").to_numpy()
    for hemi, structure in STRUCTURES.items():
        beta = rng.normal(size=(x.shape[1], n_vertices)) * 3.0
        data = (600.0 + x @ beta + rng.normal(size=(N_SCANS, n_vertices))).astype(np.float32)
        data[:, : min(200, n_vertices // 10)] = 0.0
        meta = nib.gifti.GiftiMetaData({"AnatomicalStructurePrimary": structure})
        image = nib.GiftiImage(meta=meta)
        for row in data:
            image.add_gifti_data_array(
                nib.gifti.GiftiDataArray(row, intent="NIFTI_INTENT_TIME_SERIES")
            )
        name = f"sub-01_task-x_hemi-{hemi}_space-fsaverage5_bold"
        nib.save(image, func / f"{name}.func.gii")
        (func / f"{name}.json").write_text(json.dumps({"RepetitionTime": TR}))
    return root


def report_path(root: Path, client: Any) -> Path:
    """Run the study of the dataset at ``root``; its report."""
    out = root / "out"
    config: Any = parse_config(
        {
            "inputs": {
                "bids": {
                    "derivatives": str(root / "derivatives"),
                    "raw": str(root / "raw"),
                    "space": "fsaverage5",
                }
            },
            "contrasts": CONTRASTS,
            "outputs": {"folder": str(out), "maps": ["stat", "z"], "report": True},
            "store": {"folder": str(out / "stores")},
        }
    )
    run_analysis(config, client=client)
    (path,) = out.rglob("*_report.html")
    return path


def _report(root: Path, client: Any) -> str:
    return report_path(root, client).read_text(encoding="utf-8")


def _pixels(data: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_an_fsaverage5_report_draws_each_contrasts_z_map_on_the_mesh(
    tmp_path: Path, local_client: Any
) -> None:
    page = _report(write_dataset(tmp_path, 10242), local_client)
    for name in CONTRASTS:
        found = re.findall(
            rf'<img alt="surface z map of {name}" src="data:image/png;base64,([^"]+)">', page
        )
        assert len(found) == 1, name
        pixels = _pixels(found[0])
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        # not blank: the mesh's grey shading and the colour map's reds and blues
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
        assert f"<h2>Contrast {name}</h2>" in page
    assert "Threshold: |z| ≥ 3.090. Parametric: fpr at alpha 0.001, one-sided" in page
    assert "No surface figures" not in page
    assert "contrast-a_stat-z_statmap.shape.gii" in page  # the files are linked


def test_a_mesh_nilearn_does_not_ship_gets_one_line_instead(
    tmp_path: Path, local_client: Any
) -> None:
    page = _report(write_dataset(tmp_path, 300), local_client)
    notes = re.findall(r"<p class='note'>([^<]*)</p>", page)
    assert notes == [
        "No surface figures: the mesh has 300 (L) and 300 (R) vertices; nilearn ships "
        "fsaverage5 (10242 per hemisphere), not this mesh."
    ]
    assert "surface z map" not in page
    assert "<h2>Design matrices</h2>" in page  # the rest of the report is there


def _coloured(pixels: np.ndarray) -> int:
    """Pixels of the colour map (saturated), not of the grey mesh or white page."""
    spread = pixels.max(axis=2).astype(int) - pixels.min(axis=2).astype(int)
    return int((spread > 80).sum())


def test_the_figure_colours_the_suprathreshold_vertices_and_only_them() -> None:
    """The same figure with every |z| under the threshold and with a patch of strong z on
    each hemisphere: only the second colours the mesh (the colour bar is in both)."""
    from bigglm.report.surface import surface_png

    n = 10242
    quiet = {"L": np.full(n, 2.0), "R": np.full(n, -2.0)}
    loud = {"L": quiet["L"].copy(), "R": quiet["R"].copy()}
    loud["L"][:4000], loud["R"][:4000] = 6.0, -6.0
    drawn = [_coloured(_pixels(surface_png(z, 3.09, "test"))) for z in (quiet, loud)]
    assert drawn[1] > drawn[0] + 5000, drawn
