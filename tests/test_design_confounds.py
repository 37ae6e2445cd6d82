"""fMRIPrep confounds, scrubbing regressors, and per-run designs from files.

References: the scrubbing test compares against a least-squares fit with the censored
rows deleted (what nilearn's ``sample_mask`` does), to 1e-10; the run design against
nilearn's design built from the same arrays (1e-6 of column peaks, DESIGN.md).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import make_first_level_design_matrix

from bigglm.design import (
    frame_times,
    load_confounds,
    make_design,
    make_run_design,
    scrubbing_regressors,
)
from bigglm.exceptions import DesignError

N_SCANS = 60


@pytest.fixture
def confounds_tsv(tmp_path: Path) -> Path:
    """A small fMRIPrep-style confounds file: n/a in the first row of derivatives/FD."""
    rng = np.random.default_rng(11)
    table = pd.DataFrame(
        {
            "global_signal": 500 + rng.normal(size=N_SCANS),
            "framewise_displacement": np.abs(rng.normal(0.1, 0.05, N_SCANS)),
            "dvars": 30 + rng.normal(size=N_SCANS),
            "trans_x": rng.normal(size=N_SCANS),
            "trans_x_derivative1": rng.normal(size=N_SCANS),
            "rot_z": rng.normal(size=N_SCANS),
            **{f"a_comp_cor_{k:02d}": rng.normal(size=N_SCANS) for k in range(6)},
        }
    )
    for column in ("framewise_displacement", "dvars", "trans_x_derivative1"):
        table.loc[0, column] = np.nan
    path = tmp_path / "sub-01_task-x_desc-confounds_timeseries.tsv"
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return path


def test_glob_selection_keeps_pattern_order(confounds_tsv: Path) -> None:
    table = load_confounds(confounds_tsv, ["a_comp_cor_0[0-2]", "trans_*", "rot_z"])
    assert list(table.columns) == [
        "a_comp_cor_00",
        "a_comp_cor_01",
        "a_comp_cor_02",
        "trans_x",
        "trans_x_derivative1",
        "rot_z",
    ]


@pytest.mark.parametrize("how", ["mean", "zero", "next"])
def test_leading_na_filled(confounds_tsv: Path, how: str) -> None:
    raw = pd.read_csv(confounds_tsv, sep="\t", na_values="n/a")
    table = load_confounds(confounds_tsv, ["dvars", "framewise_displacement"], fill_na=how)  # type: ignore[arg-type]
    assert not table.isna().any().any()
    for column in table.columns:
        expected = {"mean": raw[column].mean(), "zero": 0.0, "next": raw[column].iloc[1]}[how]
        assert table[column].iloc[0] == pytest.approx(expected)
        np.testing.assert_array_equal(table[column].iloc[1:], raw[column].iloc[1:])


def test_gap_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "confounds.tsv"
    pd.DataFrame({"trans_x": [0.1, np.nan, 0.2]}).to_csv(path, sep="\t", index=False, na_rep="n/a")
    with pytest.raises(DesignError, match=r"confounds.tsv: column 'trans_x' .* row 1"):
        load_confounds(path)


def test_unmatched_pattern_and_wrong_length_name_the_file(confounds_tsv: Path) -> None:
    with pytest.raises(DesignError, match=r"desc-confounds_timeseries.tsv has no column .*'c_comp"):
        load_confounds(confounds_tsv, ["c_comp_cor_*"])
    with pytest.raises(DesignError, match=r"timeseries.tsv has 60 rows but the run has 58"):
        load_confounds(confounds_tsv, n_scans=58)
    with pytest.raises(DesignError, match=r"confounds have 60 rows but there are 50 frame"):
        make_design(frame_times(50, 2.0), confounds=load_confounds(confounds_tsv))


def test_scrubbing_regressors_from_indices_or_mask() -> None:
    keep = np.ones(N_SCANS, dtype=bool)
    keep[[3, 17, 40]] = False
    from_mask = scrubbing_regressors(keep, N_SCANS)
    from_indices = scrubbing_regressors(np.flatnonzero(keep), N_SCANS)
    pd.testing.assert_frame_equal(from_mask, from_indices)
    assert list(from_mask.columns) == ["scrub_03", "scrub_17", "scrub_40"]
    np.testing.assert_array_equal(from_mask.sum(axis=0), 1.0)
    np.testing.assert_array_equal(from_mask.sum(axis=1), (~keep).astype(float))
    with pytest.raises(DesignError, match="shape"):
        scrubbing_regressors(keep[:-1], N_SCANS)
    with pytest.raises(DesignError, match=r"\[0, 59\]"):
        scrubbing_regressors([0, 60], N_SCANS)


def test_spike_columns_equal_deleting_the_volumes() -> None:
    """Betas of the other regressors equal a fit on the kept rows only."""
    rng = np.random.default_rng(5)
    events = pd.DataFrame({"onset": [10.0, 50.0, 90.0], "duration": [8.0, 8.0, 8.0]})
    keep = np.ones(N_SCANS, dtype=bool)
    keep[[0, 1, 33]] = False
    design = make_run_design(N_SCANS, 2.0, events=events, sample_mask=keep)
    data = rng.normal(size=(N_SCANS, 4))
    betas = np.linalg.pinv(design.to_numpy()) @ data
    plain = design.drop(columns=[c for c in design.columns if c.startswith("scrub_")])
    kept = np.linalg.lstsq(plain.to_numpy()[keep], data[keep], rcond=None)[0]
    others = [design.columns.get_loc(c) for c in plain.columns]
    np.testing.assert_allclose(betas[others], kept, atol=1e-10)


def test_run_design_from_files_matches_nilearn(tmp_path: Path, confounds_tsv: Path) -> None:
    events_tsv = tmp_path / "sub-01_task-x_events.tsv"
    events_tsv.write_text("onset\tduration\ttrial_type\n4\t10\tleft\n40\t10\tright\n80\t0\tleft\n")
    design = make_run_design(
        N_SCANS,
        2.0,
        events=events_tsv,
        confounds=confounds_tsv,
        confound_columns=["trans_*", "framewise_displacement"],
        slice_time_ref=0.5,
        hrf="spm + derivative",
        high_pass=0.02,
    )
    regressors = load_confounds(confounds_tsv, ["trans_*", "framewise_displacement"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = make_first_level_design_matrix(
            frame_times(N_SCANS, 2.0, 0.5),
            pd.read_csv(events_tsv, sep="\t"),
            hrf_model="spm + derivative",
            high_pass=0.02,
            add_regs=regressors,
        )
    assert list(design.columns) == list(expected.columns)
    scale = np.abs(expected.to_numpy()).max(axis=0)
    assert np.all(np.abs(design.to_numpy() - expected.to_numpy()).max(axis=0) <= 1e-6 * scale)


def test_run_design_rejects_unknown_options() -> None:
    with pytest.raises(DesignError, match=r"unknown design option\(s\) \['hrf_model'\]"):
        make_run_design(10, 2.0, hrf_model="spm")


@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_an_infinite_confound_is_a_design_error_naming_column_and_row(
    tmp_path: Path, value: str
) -> None:
    path = tmp_path / "confounds.tsv"
    path.write_text("trans_x\trot_x\n" + "".join(f"0.{i}\t0.0{i}\n" for i in range(9)))
    lines = path.read_text().splitlines()
    lines[4] = f"0.3\t{value}"  # row 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DesignError, match=r"column 'rot_x' is -?inf in row 3"):
        make_run_design(9, 2.0, confounds=path, drift=None)  # was LinAlgError in the fit
