"""Resumption recomputes exactly what is stale: every step's key covers all its inputs.

Oracle: a fresh run of the same configuration into an empty outputs folder. A rerun
after an edit must give the maps of that fresh run (to 1e-12 of each map's magnitude:
two fits in different processes may differ by a few ulps), and must reuse the steps
whose inputs did not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from bigglm.config import AnalysisConfig, parse_config
from bigglm.pipeline import run_analysis

pytestmark = pytest.mark.cluster

_MASK = "derivatives/sub-01/func/sub-01_task-tiny_desc-brain_mask.nii.gz"
_BOLD = "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.nii.gz"


def _inputs(dataset: Path) -> dict[str, Any]:
    bids = {"derivatives": str(dataset / "derivatives"), "raw": str(dataset / "raw")}
    return {"bids": {**bids, "subjects": ["01"]}, "confounds": ["trans_x"]}


def _fresh(config: AnalysisConfig, folder: Path, client: Any) -> None:
    """The same analysis run into an empty outputs folder (its own stores)."""
    outputs = config.outputs.model_copy(update={"folder": folder})
    run_analysis(config.model_copy(update={"outputs": outputs}), client=client)


def _edit(path: Path, change: Any) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(change(np.asarray(img.dataobj)), img.affine, img.header), path)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: np.roll(m, 1, axis=0), id="same-count-shifted"),
        pytest.param(lambda m: np.where(np.arange(10)[None, None, :] == 2, 0, m), id="fewer"),
    ],
)
def test_an_edited_mask_refits_and_gives_the_maps_of_a_fresh_run(
    assert_same_maps: Any,
    tiny_config: Any,
    tiny_bids: Path,
    tmp_path: Path,
    local_client: Any,
    change: Any,
) -> None:
    config = parse_config(tiny_config(tiny_bids, tmp_path / "out", inputs=_inputs(tiny_bids)))
    run_analysis(config, client=local_client)
    _edit(tiny_bids / _MASK, lambda m: change(m).astype(np.uint8))
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.steps["convert-sub-01_task-tiny"]["status"] == "ran"
    assert outcome.steps["fit"]["status"] == "ran"
    assert {outcome.steps[f"contrast-{c}"]["status"] for c in config.contrasts} == {"ran"}
    _fresh(config, tmp_path / "fresh", local_client)
    assert_same_maps(tmp_path / "out", tmp_path / "fresh")


def test_changed_data_of_the_first_run_regenerates_the_epi_mask(
    assert_same_maps: Any, tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """Runs without masks take the first run's EPI mask; when the first run's data
    change, so does that mask, and every run is converted again on the new voxels."""
    events = str(tiny_bids / "raw/sub-01/func/sub-01_task-tiny_events.tsv")
    bolds = []
    for index, shift in enumerate((0.0, 2.0)):
        path = tmp_path / f"run{index + 1}_bold.nii.gz"
        nib.save(nib.load(tiny_bids / _BOLD), path)
        _edit(path, lambda d, s=shift: d + s)
        bolds.append(path)
    cfg = tiny_config(tiny_bids, tmp_path / "out", model={"noise": "ols"})
    cfg["inputs"] = {
        "runs": [{"bold": str(b), "events": events, "subject": "01", "task": "tiny"} for b in bolds]
    }
    config = parse_config(cfg)
    (before,) = run_analysis(config, client=local_client)
    epi = config.store_folder / "sub-01_task-tiny_desc-epi_mask.nii.gz"
    old = np.asarray(nib.load(epi).dataobj).copy()

    def darker(data: np.ndarray) -> np.ndarray:  # two slices fall out of the EPI mask
        out = data.copy()
        out[:, :, :2] = 0.0
        return out

    _edit(bolds[0], darker)
    (after,) = run_analysis(config, client=local_client)
    new = np.asarray(nib.load(epi).dataobj)
    assert not np.array_equal(old, new) and not new[:, :, :2].any()
    assert after.n_voxels == new.sum() != before.n_voxels
    converted = {k: v["status"] for k, v in after.steps.items() if k.startswith("convert")}
    assert set(converted.values()) == {"ran"} and len(converted) == 2
    _fresh(config, tmp_path / "fresh", local_client)
    assert_same_maps(tmp_path / "out", tmp_path / "fresh")


def test_a_changed_contrast_reuses_the_fit_and_recomputes_its_maps(
    assert_same_maps: Any, tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    cfg = tiny_config(tiny_bids, tmp_path / "out", inputs=_inputs(tiny_bids))
    run_analysis(parse_config(cfg), client=local_client)
    cfg["contrasts"] = {**cfg["contrasts"], "a_minus_b": "b - a"}
    config = parse_config(cfg)
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.steps["fit"]["status"] == "reused"
    assert outcome.steps["contrast-a_minus_b"]["status"] == "ran"
    assert outcome.steps["contrast-a"]["status"] == "reused"
    _fresh(config, tmp_path / "fresh", local_client)
    assert_same_maps(tmp_path / "out", tmp_path / "fresh")


def test_a_store_replaced_with_other_voxels_is_converted_again(
    assert_same_maps: Any, tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """The convert step's record is not enough: the store on disk must still hold the
    configured mask's voxels (here it was remade elsewhere with an EPI mask)."""
    import bigglm

    config = parse_config(tiny_config(tiny_bids, tmp_path / "out", inputs=_inputs(tiny_bids)))
    run_analysis(config, client=local_client)
    store = config.store_folder / "sub-01_task-tiny_bold.zarr"
    bigglm.convert(tiny_bids / _BOLD, store, overwrite=True)  # the EPI mask: other voxels
    (outcome,) = run_analysis(config, client=local_client)
    assert outcome.steps["convert-sub-01_task-tiny"]["status"] == "ran"
    assert outcome.n_voxels == 8 * 8 * 8
    _fresh(config, tmp_path / "fresh", local_client)
    assert_same_maps(tmp_path / "out", tmp_path / "fresh")


def test_a_store_without_the_masks_nonfinite_voxels_is_reused(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """Conversion drops mask voxels with NaN values (and records how many): that store
    still holds the mask's voxels, so a rerun reuses every step."""
    from bigglm.exceptions import BigGLMWarning

    def one_nan(data: np.ndarray) -> np.ndarray:
        out = data.copy()
        out[4, 4, 4, 10] = np.nan
        return out

    _edit(tiny_bids / _BOLD, one_nan)
    config = parse_config(tiny_config(tiny_bids, tmp_path / "out", inputs=_inputs(tiny_bids)))
    with pytest.warns(BigGLMWarning, match="NaN or Inf"):
        (first,) = run_analysis(config, client=local_client)
    assert first.n_voxels == 8 * 8 * 8 - 1
    (again,) = run_analysis(config, client=local_client)
    assert {s["status"] for s in again.steps.values()} == {"reused"}


def test_analyses_sharing_a_store_folder_with_different_masks_keep_their_own_stores(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """Two analyses of one run with different ``inputs.mask``, one ``store.folder``: each
    has its own store. They had one path, so each analysis replaced the store the other
    was fitting from (run together: both failed, each setting the other's store aside as
    'damaged'; run in turn: every run converted again)."""
    smaller = tmp_path / "smaller_mask.nii.gz"
    img = nib.load(tiny_bids / _MASK)
    data = np.asarray(img.dataobj).astype(np.uint8)
    data[:, :, 2] = 0
    nib.save(nib.Nifti1Image(data, img.affine), smaller)
    stores = {"folder": str(tmp_path / "stores"), "time_chunk": 16}

    def config(name: str, mask: Path) -> AnalysisConfig:
        inputs = {**_inputs(tiny_bids), "mask": str(mask)}
        return parse_config(tiny_config(tiny_bids, tmp_path / name, inputs=inputs, store=stores))

    first, second = config("a", tiny_bids / _MASK), config("b", smaller)
    run_analysis(first, client=local_client)
    (made,) = [p for p in (tmp_path / "stores").iterdir() if p.suffix == ".zarr"]
    inode = made.stat().st_ino
    run_analysis(second, client=local_client)
    assert made.stat().st_ino == inode  # not replaced by the other analysis's store
    (again,) = run_analysis(first, client=local_client)
    assert again.steps["convert-sub-01_task-tiny"]["status"] == "reused"
    assert again.steps["fit"]["status"] == "reused"


def test_maps_an_earlier_version_named_stat_stat_are_kept_and_the_new_names_written(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path, local_client: Any
) -> None:
    """Outputs and records of a version that wrote ``stat-stat``: a rerun reuses the stores
    and the fit, writes ``stat-t``/``stat-F``, and leaves the old files as they are."""
    import json

    from bigglm.pipeline.records import _digest

    cfg = tiny_config(tiny_bids, tmp_path / "out", inputs=_inputs(tiny_bids))
    config = parse_config(cfg)
    run_analysis(config, client=local_client)
    unit, steps = tmp_path / "out/sub-01", tmp_path / "out/.bigglm/steps/sub-01_task-tiny"
    old = {}
    for path in sorted(unit.glob("*_stat-[tF]_statmap.nii.gz")):  # as the old version named them
        stat = "_stat-t_" if "_stat-t_" in path.name else "_stat-F_"
        old[path] = path.rename(path.with_name(path.name.replace(stat, "_stat-stat_")))
    assert len(old) == 3  # a, a_minus_b (t) and any (F)
    fit_key = json.loads((steps / "fit.json").read_text())["key"]
    for name, spec in config.contrasts.items():  # the old contrast step's key: version 2,
        kind = "F" if isinstance(spec, list) else "t"  # the config's map names
        record = steps / f"contrast-{name}.json"
        key = _digest("contrast", 2, fit_key, spec, kind, sorted(config.outputs.maps))
        record.write_text(json.dumps({**json.loads(record.read_text()), "key": key}))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in old.values()}

    (outcome,) = run_analysis(config, client=local_client)
    assert {k: v["status"] for k, v in outcome.steps.items() if v["status"] == "ran"} == {
        f"contrast-{name}": "ran" for name in config.contrasts
    }
    for new, stale in old.items():
        np.testing.assert_array_equal(nib.load(new).get_fdata(), nib.load(stale).get_fdata())
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in old.values()} == before
    assert not [p for p in outcome.maps if "stat-stat" in p.name]
    (again,) = run_analysis(config, client=local_client)
    assert {s["status"] for s in again.steps.values()} == {"reused"}
