"""BIDS derivatives discovery on fMRIPrep-shaped folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bigglm.bids import find_runs, map_prefix, parse_entities
from bigglm.exceptions import ConfigError


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _layout(root: Path) -> tuple[Path, Path]:
    """Two subjects; sub-02 has two sessions and two runs; two output spaces."""
    deriv, raw = root / "deriv", root / "raw"
    for sub, ses, run in [("01", None, None), ("02", "1", "1"), ("02", "1", "2"), ("02", "2", "1")]:
        folder = f"sub-{sub}" + (f"/ses-{ses}" if ses else "") + "/func"
        ents = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + "_task-faces"
        ents += f"_run-{run}" if run else ""
        for space in ("MNI152NLin2009cAsym", "T1w"):
            _touch(deriv / folder / f"{ents}_space-{space}_desc-preproc_bold.nii.gz")
            _touch(deriv / folder / f"{ents}_space-{space}_desc-brain_mask.nii.gz")
            sidecar = {"RepetitionTime": 2.0, "StartTime": 0.5}
            _touch(
                deriv / folder / f"{ents}_space-{space}_desc-preproc_bold.json", json.dumps(sidecar)
            )
        _touch(deriv / folder / f"{ents}_desc-confounds_timeseries.tsv", "trans_x\n0\n")
        _touch(raw / folder / f"{ents}_events.tsv", "onset\tduration\n")
    return deriv, raw


def test_entities_are_parsed_in_order() -> None:
    entities = parse_entities("/x/sub-01_ses-2_task-a_run-03_space-T1w_desc-preproc_bold.nii.gz")
    assert entities == {
        "sub": "01",
        "ses": "2",
        "task": "a",
        "run": "03",
        "space": "T1w",
        "desc": "preproc",
        "suffix": "bold",
    }


def test_runs_found_with_their_files_by_entity(tmp_path: Path) -> None:
    deriv, raw = _layout(tmp_path)
    runs = find_runs(deriv, raw=raw, space="MNI152NLin2009cAsym")
    assert [(r.subject, r.session, r.run) for r in runs] == [
        ("01", None, None),
        ("02", "1", "1"),
        ("02", "1", "2"),
        ("02", "2", "1"),
    ]
    second = runs[1]
    prefix = "sub-02_ses-1_task-faces_run-1"
    assert (
        second.mask
        == deriv
        / "sub-02/ses-1/func"
        / f"{prefix}_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"
    )
    assert (
        second.confounds == deriv / "sub-02/ses-1/func" / f"{prefix}_desc-confounds_timeseries.tsv"
    )
    assert second.events == raw / "sub-02/ses-1/func" / f"{prefix}_events.tsv"
    assert (second.tr, second.start_time) == (2.0, 0.5)
    assert second.unit == "sub-02_task-faces"
    assert second.name == prefix


def test_several_spaces_need_a_choice(tmp_path: Path) -> None:
    deriv, raw = _layout(tmp_path)
    with pytest.raises(ConfigError, match=r"inputs.bids.space: .*MNI152NLin2009cAsym, T1w"):
        find_runs(deriv, raw=raw)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"subjects": ["02"]}, 3),
        ({"subjects": ["02"], "sessions": ["1"]}, 2),
        ({"runs": ["1"]}, 2),  # run-1 only; sub-01 has no run entity
        ({"tasks": ["faces"]}, 4),
    ],
)
def test_filters(tmp_path: Path, filters: dict[str, list[str]], expected: int) -> None:
    deriv, raw = _layout(tmp_path)
    assert len(find_runs(deriv, raw=raw, space="T1w", **filters)) == expected


def test_run_filter_compares_indices_as_numbers(tmp_path: Path) -> None:
    _touch(tmp_path / "sub-01/func/sub-01_task-a_run-01_desc-preproc_bold.nii.gz")
    _touch(
        tmp_path / "sub-01/func/sub-01_task-a_run-01_desc-preproc_bold.json",
        '{"RepetitionTime": 1}',
    )
    assert [r.run for r in find_runs(tmp_path, runs=["1"])] == ["01"]


def test_nothing_matching_is_an_error_naming_the_filters(tmp_path: Path) -> None:
    deriv, raw = _layout(tmp_path)
    with pytest.raises(ConfigError, match=r"no \*_desc-preproc_bold.nii.gz .* \{'sub': \['09'\]\}"):
        find_runs(deriv, raw=raw, subjects=["09"], space="T1w")


def test_events_and_sidecar_inherited_from_the_dataset_root(tmp_path: Path) -> None:
    deriv, raw = tmp_path / "deriv", tmp_path / "raw"
    _touch(deriv / "sub-01/func/sub-01_task-a_desc-preproc_bold.nii.gz")
    _touch(raw / "task-a_events.tsv", "onset\tduration\n")
    _touch(raw / "task-a_bold.json", json.dumps({"RepetitionTime": 2.5, "StartTime": 1.0}))
    _touch(raw / "sub-01/func/sub-01_task-a_bold.json", json.dumps({"StartTime": 1.25}))
    (run,) = find_runs(deriv, raw=raw)
    assert run.events == raw / "task-a_events.tsv"
    assert (run.tr, run.start_time) == (2.5, 1.25)  # the more specific sidecar wins


def test_events_in_the_derivatives_folder_are_used_without_raw(tmp_path: Path) -> None:
    events = _touch(tmp_path / "sub-01/func/sub-01_task-a_events.tsv")
    _touch(tmp_path / "sub-01/func/sub-01_task-a_desc-preproc_bold.nii.gz")
    (run,) = find_runs(tmp_path)
    assert run.events == events
    assert run.tr is None  # no sidecar: the pipeline falls back to the NIfTI header


def test_broken_sidecar_names_the_file(tmp_path: Path) -> None:
    _touch(tmp_path / "sub-01/func/sub-01_task-a_desc-preproc_bold.nii.gz")
    _touch(tmp_path / "sub-01/func/sub-01_task-a_desc-preproc_bold.json", "{not json")
    with pytest.raises(ConfigError, match=r"sub-01_task-a_desc-preproc_bold.json: cannot read"):
        find_runs(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        find_runs(tmp_path / "nope")


@pytest.mark.parametrize("value", ["two", [2], True])
def test_a_repetition_time_that_is_not_a_number_is_a_config_error(
    tmp_path: Path, value: object
) -> None:
    _touch(tmp_path / "sub-01/func/sub-01_task-a_desc-preproc_bold.nii.gz")
    sidecar = {"RepetitionTime": value}
    _touch(tmp_path / "sub-01/func/sub-01_task-a_desc-preproc_bold.json", json.dumps(sidecar))
    with pytest.raises(
        ConfigError, match=rf"has RepetitionTime {re.escape(repr(value))}; expected a number"
    ):
        find_runs(tmp_path)


def test_the_no_match_message_names_the_space_filter(tmp_path: Path) -> None:
    deriv, raw = _layout(tmp_path)
    with pytest.raises(ConfigError, match=r"matches the filters \{\} in space 'MNI'; "):
        find_runs(deriv, raw=raw, space="MNI")


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([["sub-01_ses-2_task-faces_run-1_bold.nii.gz"]], "sub-01_ses-2_task-faces_run-1"),
        (  # fMRIPrep: desc describes the bold's preprocessing, not the map
            [["/d/sub-01_task-faces_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"]],
            "sub-01_task-faces_space-MNI152NLin2009cAsym",
        ),
        (  # runs fitted together: what they share, never the run
            [
                ["sub-01_ses-2_task-faces_run-1_bold.nii"],
                ["sub-01_ses-2_task-faces_run-2_bold.nii"],
            ],
            "sub-01_ses-2_task-faces",
        ),
        (
            [["sub-01_ses-1_task-x_run-1_bold.nii"], ["sub-01_ses-2_task-x_run-1_bold.nii"]],
            "sub-01_task-x",
        ),
        ([["sub-01_task-x_bold.nii"], ["sub-01_task-x_acq-fast_bold.nii"]], "sub-01_task-x"),
        ([["sub-01_task-x_bold.nii"], ["sub-02_task-x_bold.nii"]], "task-x"),
        ([["a/sub-01_task-x_bold.nii", "b/sub-01_task-x_bold.nii"]], "sub-01_task-x"),  # 3D volumes
    ],
)
def test_map_prefix_is_the_bids_entities_the_runs_share(
    runs: list[list[str]], expected: str
) -> None:
    assert map_prefix(runs) == expected


@pytest.mark.parametrize(
    "runs",
    [
        [],
        [[]],
        [["bold.nii.gz"]],
        [["sub-01_task-x_bold.tsv"]],
        [["task-x_sub-01_bold.nii"]],  # sub first
        [["sub-01_task-x_desc-preproc_mask.nii.gz"]],  # not a bold file
        [["sub-01_task-x_extra_bold.nii"]],  # a part that is not key-value
        [["sub-01_task-x_task-y_bold.nii"]],  # an entity twice
        [["sub-01_task-a b_bold.nii"]],
        [["sub-01_task-x_bold.nii"], ["bold.nii"]],  # one run is not BIDS-named
        [["sub-01_task-x_run-1_bold.nii", "sub-01_task-x_run-2_bold.nii"]],  # sources disagree
    ],
)
def test_map_prefix_is_none_without_bids_bold_names(runs: list[list[str]]) -> None:
    assert map_prefix(runs) is None


# --- surfaces: fMRIPrep's GIFTI pairs and CIFTI-2 series ------------------------------


def _surface_layout(root: Path, *, hemi_first: bool = True) -> Path:
    """The layout of ``_layout`` plus fMRIPrep's fsaverage5 GIFTI pairs and fsLR CIFTI."""
    deriv, _ = _layout(root)
    for bold in sorted(deriv.rglob("*_space-T1w_desc-preproc_bold.nii.gz")):
        ents = bold.name.split("_space-")[0]
        for hemi in ("L", "R"):
            order = (
                f"hemi-{hemi}_space-fsaverage5" if hemi_first else f"space-fsaverage5_hemi-{hemi}"
            )
            _touch(bold.parent / f"{ents}_{order}_bold.func.gii")
            _touch(bold.parent / f"{ents}_{order}_bold.json", json.dumps({"RepetitionTime": 1.5}))
        _touch(bold.parent / f"{ents}_space-fsLR_den-91k_bold.dtseries.nii")
        _touch(bold.parent / f"{ents}_space-fsLR_den-91k_bold.json", '{"RepetitionTime": 2.5}')
    return deriv


@pytest.mark.parametrize("hemi_first", [True, False])
def test_gifti_hemispheres_are_paired_into_one_run(tmp_path: Path, hemi_first: bool) -> None:
    deriv = _surface_layout(tmp_path, hemi_first=hemi_first)
    runs = find_runs(deriv, raw=tmp_path / "raw", space="fsaverage5")
    assert [(r.subject, r.session, r.run) for r in runs] == [
        ("01", None, None),
        ("02", "1", "1"),
        ("02", "1", "2"),
        ("02", "2", "1"),
    ]
    for r in runs:
        assert r.geometry == "vertex"
        assert "hemi-L" in r.bold.name and r.right is not None and "hemi-R" in r.right.name
        assert r.bold.name.replace("hemi-L", "hemi-R") == r.right.name
        assert r.files == (r.bold, r.right)
        assert r.tr == 1.5  # the GIFTI series' own sidecar
        assert r.mask is None  # fMRIPrep writes no surface masks; no volume mask is taken
        assert r.confounds is not None and r.confounds.name.endswith("confounds_timeseries.tsv")
        assert r.events is not None and r.events.name.endswith("_events.tsv")
        assert "hemi" not in r.entities and r.entities["space"] == "fsaverage5"
    assert runs[1].name == "sub-02_ses-1_task-faces_run-1"


def test_cifti_series_are_found_in_their_space(tmp_path: Path) -> None:
    deriv = _surface_layout(tmp_path)
    runs = find_runs(deriv, raw=tmp_path / "raw", space="fsLR", subjects=["01"])
    (run,) = runs
    assert run.bold.name == "sub-01_task-faces_space-fsLR_den-91k_bold.dtseries.nii"
    assert run.geometry == "grayordinate" and run.right is None and run.files == (run.bold,)
    assert run.tr == 2.5 and run.mask is None
    assert run.confounds == deriv / "sub-01/func/sub-01_task-faces_desc-confounds_timeseries.tsv"
    assert run.entities["den"] == "91k"


def test_space_chooses_between_volumes_and_surfaces(tmp_path: Path) -> None:
    deriv = _surface_layout(tmp_path)
    volume = find_runs(deriv, space="T1w", subjects=["01"])
    assert [r.bold.name for r in volume] == ["sub-01_task-faces_space-T1w_desc-preproc_bold.nii.gz"]
    assert volume[0].geometry == "voxel" and volume[0].mask is not None
    # without 'space', surface outputs are not looked for: the volumes' spaces alone count
    with pytest.raises(ConfigError, match=r"several spaces \(MNI152NLin2009cAsym, T1w\)"):
        find_runs(deriv)


def test_a_gifti_run_without_its_other_hemisphere_is_refused(tmp_path: Path) -> None:
    deriv = _surface_layout(tmp_path)
    func = deriv / "sub-02/ses-1/func"
    (func / "sub-02_ses-1_task-faces_run-2_hemi-R_space-fsaverage5_bold.func.gii").unlink()
    present = missing_pair = "sub-02_ses-1_task-faces_run-2_hemi-{}_space-fsaverage5_bold.func.gii"
    message = (
        f"{present.format('L')} has no other hemisphere: {missing_pair.format('R')} is missing"
    )
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        find_runs(deriv, space="fsaverage5")
    assert str(err.value).count("\n") == 0
    # the run left out by the filters, the others are found
    assert len(find_runs(deriv, space="fsaverage5", runs=["1"])) == 2  # sub-01 has no run-


def test_a_gifti_series_without_a_hemisphere_is_refused(tmp_path: Path) -> None:
    deriv = _surface_layout(tmp_path)
    _touch(deriv / "sub-01/func/sub-01_task-other_space-fsaverage5_bold.func.gii")
    with pytest.raises(
        ConfigError, match=r"task-other_space-fsaverage5_bold\.func\.gii has no hemi-L or hemi-R"
    ):
        find_runs(deriv, space="fsaverage5")
