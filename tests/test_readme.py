"""The README's Python examples run as written, in order, on tiny files with their names.

Every ```python block runs in one namespace, in a temporary folder holding small inputs
named as the README names them. A block that cannot run here is marked in the README
with an HTML comment on the line before it, ``<!-- not run: why -->``; only that marker
skips a block.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pandas as pd
import pytest

from bigglm.design import frame_times, make_design

README = Path(__file__).resolve().parents[1] / "README.md"
N_SCANS, TR = 240, 2.0
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each Python block not marked ``<!-- not run: ... -->``."""
    blocks = []
    for match in _BLOCK.finditer(text):
        if match["before"].strip().startswith("<!-- not run:"):
            continue
        line = text.count("\n", 0, match.start("code")) + 1
        blocks.append((line, match["code"]))
    return blocks


def _events() -> pd.DataFrame:
    onsets = np.arange(10.0, N_SCANS * TR - 40, 30.0)
    kinds = ["faces", "houses"] * len(onsets)
    return pd.DataFrame({"onset": onsets, "duration": 12.0, "trial_type": kinds[: len(onsets)]})


def _write_inputs(folder: Path, brain_series: Any) -> None:
    """The files the README's examples read, small: an 8^3 brain, 240 volumes of TR 2 s."""
    events = _events()
    events.to_csv(folder / "sub-01_task-faces_events.tsv", sep="\t", index=False)
    x = make_design(frame_times(N_SCANS, TR), events, drift=None)
    rng = np.random.default_rng(0)
    names = [f"{k}_{a}" for k in ("trans", "rot") for a in "xyz"]
    names += [f"a_comp_cor_{i:02d}" for i in range(6)]
    confounds = pd.DataFrame(rng.normal(0, 0.1, (N_SCANS, len(names))), columns=names)
    confounds.to_csv(
        folder / "sub-01_task-faces_desc-confounds_timeseries.tsv", sep="\t", index=False
    )
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for index, name in enumerate(["sub-01", "sub-01_run-1", "sub-01_run-2"]):
        data = brain_series((8, 8, 8), N_SCANS, index)
        data += 20.0 * (x["faces"].to_numpy() - 0.5 * x["houses"].to_numpy()).astype(np.float32)
        image = nibabel.Nifti1Image(data, affine)
        image.header.set_xyzt_units("mm", "sec")
        image.header["pixdim"][4] = TR
        nibabel.save(image, folder / f"{name}_bold.nii.gz")
    mask = (data.mean(axis=-1) > 500).astype(np.uint8)
    nibabel.save(nibabel.Nifti1Image(mask, affine), folder / "sub-01_mask.nii.gz")
    _write_group_inputs(folder, mask.astype(bool), affine, rng)


def _write_group_inputs(folder: Path, mask: np.ndarray, affine: np.ndarray, rng: Any) -> None:
    """Subjects 02-08's first-level maps (sub-01's come from the README's own fit) and a
    participants.tsv for the group example."""
    for s in range(2, 9):
        out = folder / "derivatives" / f"sub-{s:02d}"
        out.mkdir(parents=True)
        for stat, values in (
            ("effect", rng.normal(20, 5, mask.shape)),
            ("variance", rng.uniform(1, 4, mask.shape)),
        ):
            data = np.where(mask, values, np.nan).astype(np.float32)
            name = f"sub-{s:02d}_task-faces_contrast-facesMinusHouses_stat-{stat}_statmap.nii.gz"
            nibabel.save(nibabel.Nifti1Image(data, affine), out / name)
    participants = pd.DataFrame(
        {
            "participant_id": [f"sub-{s:02d}" for s in range(1, 9)],
            "age": [23, 35, 41, 29, 52, 33, 47, 38],
            "group": ["patient", "control"] * 4,
            "site": ["a", "a", "b", "b", "c", "c", "d", "d"],
        }
    )
    participants.to_csv(folder / "participants.tsv", sep="\t", index=False)
    z = rng.normal(0.0, 1.0, (12, 12, 12))
    z[3:7, 3:7, 3:7] += 6.0  # a blob that survives FDR
    nibabel.save(nibabel.Nifti1Image(z.astype(np.float32), affine), folder / "zmap.nii.gz")


def test_the_readme_has_python_examples() -> None:
    assert len(python_blocks(README.read_text())) >= 3


def test_not_run_marker_is_the_only_way_to_skip_a_block() -> None:
    text = "a\n```python\nx = 1\n```\n<!-- not run: needs SLURM -->\n```python\ny = 2\n```\n"
    assert [code for _, code in python_blocks(text)] == ["x = 1"]


def test_readme_python_examples_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, brain_series: Any
) -> None:
    _write_inputs(tmp_path, brain_series)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for line, code in python_blocks(README.read_text()):
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as err:
            pytest.fail(f"the README block at line {line} fails: {type(err).__name__}: {err}")
    assert (tmp_path / "sub-01_glm.zarr").is_dir()
