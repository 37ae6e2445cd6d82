"""Events tables: reading, bad input, and invariants of the convolved regressors.

Invariant tests use exact identities (linearity, additivity over conditions, shifts by
whole TRs) checked to 1e-10 of the column peak: only floating-point rounding separates
the two sides.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bigglm.design import frame_times, make_design, read_events
from bigglm.exceptions import BigGLMWarning, DesignError

TIMES = frame_times(120, 2.0)


def write_tsv(path: Path, text: str) -> Path:
    path.write_text(text.replace("|", "\t"))
    return path


def test_reads_bids_tsv_with_na(tmp_path: Path) -> None:
    path = write_tsv(
        tmp_path / "sub-01_task-x_events.tsv",
        "onset|duration|trial_type|response_time\n0|2|go|0.5\n10|2|stop|n/a\n",
    )
    events = read_events(path)
    assert list(events.columns) == ["trial_type", "onset", "duration", "modulation"]
    assert events["trial_type"].tolist() == ["go", "stop"]
    np.testing.assert_array_equal(events["modulation"], 1.0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("onset|trial_type\n0|go\n", r"no column 'duration'"),
        ("onset|duration\n0|2\nn/a|2\n", r"'onset' has a missing .* row 1"),
        ("onset|duration\n0|2\nsoon|2\n", r"'onset' has a missing or non-numeric value 'soon'"),
        ("onset|duration\n0|2\n5|-1\n", r"negative duration -1.0 in row 1"),
        ("onset|duration|trial_type\n0|2|go\n5|1|n/a\n", r"'trial_type' is empty in row 1"),
        ("onset|duration|modulation\n0|2|1\n5|1|n/a\n", r"'modulation' has a missing .* row 1"),
    ],
)
def test_bad_events_name_file_column_and_row(tmp_path: Path, text: str, match: str) -> None:
    path = write_tsv(tmp_path / "events.tsv", text)
    with pytest.raises(DesignError, match=match) as info:
        make_design(TIMES, path)
    assert str(path) in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DesignError, match=r"nope\.tsv does not exist"):
        read_events(tmp_path / "nope.tsv")


def test_events_after_the_run_warn() -> None:
    events = pd.DataFrame({"onset": [10.0, 300.0], "duration": [1.0, 1.0]})
    with pytest.warns(BigGLMWarning, match=r"start after the last frame .* row 1, onset 300"):
        design = make_design(TIMES, events)
    assert design["dummy"].abs().max() > 0


@pytest.mark.parametrize(
    ("times", "match"),
    [
        (np.array([0.0, 2.0, 2.0, 4.0]), "frame 2 .* is not after frame 1"),
        (np.array([0.0, 2.0, 1.0]), "must increase"),
        (np.array([3.0]), "at least 2"),
        (np.array([0.0, np.nan, 4.0]), "finite"),
    ],
)
def test_bad_frame_times(times: np.ndarray, match: str) -> None:
    with pytest.raises(DesignError, match=match):
        make_design(times)


def test_reserved_column_names_collide() -> None:
    events = pd.DataFrame({"onset": [0.0], "duration": [1.0], "trial_type": ["constant"]})
    with pytest.raises(DesignError, match=r"\['constant'\] appear twice"):
        make_design(TIMES, events)


# --- properties of the regressors ---------------------------------------------------------

# Onsets 0.013 s off a 0.1-s lattice are >= 0.007 s from every point of the 0.04-s
# convolution grid (TR 2 s, oversampling 50), so no onset sits on a grid boundary.
onset_values = st.integers(0, 1800).map(lambda k: k * 0.1 + 0.013)
tables = st.lists(
    st.tuples(onset_values, st.sampled_from([0.0, 0.5, 3.0, 20.0]), st.sampled_from("abc")),
    min_size=1,
    max_size=10,
).map(lambda rows: pd.DataFrame(rows, columns=["onset", "duration", "trial_type"]))


def _columns(events: pd.DataFrame, **kwargs: object) -> pd.DataFrame:
    """Event columns only; random tables may repeat a condition (rank deficiency)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the design is rank deficient", BigGLMWarning)
        design = make_design(TIMES, events, drift=None, **kwargs)  # type: ignore[arg-type]
    return design.drop(columns="constant")


@settings(max_examples=30, deadline=None)
@given(events=tables, scale=st.floats(-5.0, 5.0).filter(lambda s: abs(s) > 0.01))
def test_linear_in_modulation(events: pd.DataFrame, scale: float) -> None:
    events = events.drop_duplicates(["onset", "duration", "trial_type"])
    base = _columns(events)
    scaled = _columns(events.assign(modulation=scale))
    np.testing.assert_allclose(scaled, scale * base, atol=1e-10 * max(1.0, abs(scale)))


@settings(max_examples=30, deadline=None)
@given(events=tables)
def test_conditions_add_up(events: pd.DataFrame) -> None:
    """One condition holding every event equals the sum of the per-condition columns."""
    events = events.drop_duplicates(["onset", "duration", "trial_type"])
    separate = _columns(events)
    pooled = _columns(
        events.assign(trial_type="all").groupby(["onset", "duration"], as_index=False).size()
        .rename(columns={"size": "modulation"}).assign(trial_type="all")
    )  # fmt: skip
    np.testing.assert_allclose(pooled["all"], separate.sum(axis=1), atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(events=tables, shift=st.integers(1, 20))
def test_shift_by_whole_trs_shifts_rows(events: pd.DataFrame, shift: int) -> None:
    events = events[events["onset"] < 150].drop_duplicates(["onset", "duration", "trial_type"])
    assume(not events.empty)
    base = _columns(events)
    moved = _columns(events.assign(onset=events["onset"] + 2.0 * shift))
    np.testing.assert_allclose(moved.to_numpy()[shift:], base.to_numpy()[:-shift], atol=1e-10)
    np.testing.assert_allclose(moved.to_numpy()[:shift], 0.0, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(duration=st.floats(40.0, 100.0), onset=st.floats(0.0, 60.0))
def test_long_block_plateaus_at_its_modulation(duration: float, onset: float) -> None:
    """Unit-sum kernels: a block longer than the HRF reaches its amplitude."""
    events = pd.DataFrame({"onset": [onset], "duration": [duration], "modulation": [2.5]})
    column = _columns(events, hrf="spm")["dummy"]
    inside = column[(TIMES > onset + 32.5) & (TIMES < onset + duration)]
    assume(inside.size > 0)
    np.testing.assert_allclose(inside, 2.5, rtol=1e-3)


def test_zero_duration_amplitude_scales_with_the_grid_step() -> None:
    """Documented (nilearn's convention): a zero-duration event lasts one grid step."""
    events = pd.DataFrame({"onset": [20.0], "duration": [0.0]})
    # column sums approximate the response's area / TR, i.e. the event's area
    areas = {
        oversampling: _columns(events, oversampling=oversampling)["dummy"].sum()
        for oversampling in (25, 50)
    }
    assert areas[50] / areas[25] == pytest.approx(0.5, rel=1e-3)
    block = _columns(events.assign(duration=1.0), oversampling=50)["dummy"].sum()
    assert block / areas[50] == pytest.approx(1.0 / 0.04, rel=0.05)  # 1 s vs one 0.04-s step


def test_condition_names_that_collide_with_derivative_columns() -> None:
    events = pd.DataFrame(
        {"onset": [0.0, 20.0], "duration": [1.0, 1.0], "trial_type": ["a", "a_derivative"]}
    )
    with pytest.raises(DesignError, match="'a_derivative'; rename a trial_type"):
        make_design(TIMES, events, hrf="spm + derivative")


def test_an_empty_events_file_is_a_design_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "sub-01_task-a_events.tsv"
    path.write_text("")  # pandas: EmptyDataError
    with pytest.raises(DesignError, match=r"events file .*sub-01_task-a_events.tsv is empty"):
        read_events(path)


def test_a_fifo_is_not_called_a_missing_file(tmp_path: Path) -> None:
    fifo = tmp_path / "no such file"
    os.mkfifo(fifo)
    with pytest.raises(DesignError, match=r"is a named pipe \(FIFO\), not a regular file"):
        read_events(fifo)  # and does not block on the read


def test_trial_type_with_a_trailing_space_is_warned(tmp_path: Path) -> None:
    path = tmp_path / "events.tsv"
    path.write_text("onset\tduration\ttrial_type\n0\t5\tfaces\n20\t5\tfaces \n")
    with pytest.warns(BigGLMWarning, match=r"trial_type 'faces ' in row 1 .* apart from 'faces'"):
        events = read_events(path)
    assert sorted(set(events["trial_type"])) == ["faces", "faces "]  # kept as written
