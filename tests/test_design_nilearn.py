"""make_design against nilearn's make_first_level_design_matrix (0.14.1).

Agreement criterion (DESIGN.md): same column names in the same order, and values equal
to 1e-6 of each column's largest magnitude. Both libraries build the same oversampled
grid and kernels, so the observed differences are at rounding level (~1e-12).

Also tested here: the documented places where bigglm deliberately differs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nilearn.glm.first_level import make_first_level_design_matrix
from seed_hrfs import SEED_GAMMA, SEED_POWER

from bigglm.design import frame_times, make_design
from bigglm.exceptions import BigGLMWarning

HRF_MODELS = [
    "spm",
    "glover",
    "spm + derivative",
    "glover + derivative",
    "spm + derivative + dispersion",
    "glover + derivative + dispersion",
    None,
]


def nilearn_design(times: np.ndarray, events: pd.DataFrame | None, **kwargs: Any) -> pd.DataFrame:
    """nilearn's design, its informational warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_first_level_design_matrix(times, events, **kwargs)


def assert_same_design(ours: pd.DataFrame, theirs: pd.DataFrame) -> None:
    assert list(ours.columns) == list(theirs.columns)
    np.testing.assert_allclose(ours.index.to_numpy(), theirs.index.to_numpy())
    scale = np.abs(theirs.to_numpy()).max(axis=0)
    error = np.abs(ours.to_numpy() - theirs.to_numpy()).max(axis=0)
    worst = int(np.argmax(error / np.where(scale > 0, scale, 1.0)))
    assert np.all(error <= 1e-6 * np.where(scale > 0, scale, 1.0)), (
        f"column {theirs.columns[worst]!r}: max difference {error[worst]:.3g} "
        f"for a column peak of {scale[worst]:.3g}"
    )


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    """Three conditions, block and zero-duration events, on-grid and off-grid onsets."""
    rng = np.random.default_rng(7)
    onsets = np.sort(rng.uniform(0, 170, 24)).round(2)
    onsets[:4] = [0.0, 10.0, 20.0, 31.0]  # exactly on the TR grid
    return pd.DataFrame(
        {
            "onset": onsets,
            "duration": rng.choice([0.0, 1.0, 2.5, 12.0], onsets.size),
            "trial_type": rng.choice(["faces", "houses", "scrambled"], onsets.size),
        }
    )


@pytest.mark.parametrize("hrf", HRF_MODELS)
@pytest.mark.parametrize("oversampling", [1, 7, 50])
@pytest.mark.parametrize("slice_time_ref", [0.0, 0.5])
def test_hrf_models(
    events: pd.DataFrame, hrf: str | None, oversampling: int, slice_time_ref: float
) -> None:
    times = frame_times(90, 2.0, slice_time_ref)
    ours = make_design(times, events, hrf=hrf, oversampling=oversampling)
    theirs = nilearn_design(times, events, hrf_model=hrf, oversampling=oversampling)
    assert_same_design(ours, theirs)


@pytest.mark.parametrize("delays", [[0], [0, 1, 2, 3], [2, 5]])
@pytest.mark.parametrize("oversampling", [1, 50])
def test_fir(events: pd.DataFrame, delays: list[int], oversampling: int) -> None:
    times = frame_times(90, 2.0)
    ours = make_design(times, events, hrf="fir", fir_delays=delays, oversampling=oversampling)
    theirs = nilearn_design(
        times, events, hrf_model="fir", fir_delays=delays, oversampling=oversampling
    )
    assert_same_design(ours, theirs)


def test_frame_times_match_first_level_model() -> None:
    """nilearn's FirstLevelModel: linspace(ref * tr, (n - 1 + ref) * tr, n)."""
    for ref in (0.0, 0.3, 1.0):
        expected = np.linspace(ref * 1.5, (40 - 1 + ref) * 1.5, 40)
        np.testing.assert_array_equal(frame_times(40, 1.5, ref), expected)


def test_zero_durations_and_modulation(events: pd.DataFrame) -> None:
    table = events.assign(duration=0.0, modulation=np.linspace(-1.0, 2.0, len(events)))
    times = frame_times(90, 2.0)
    for hrf in ("spm", "glover + derivative"):
        assert_same_design(
            make_design(times, table, hrf=hrf), nilearn_design(times, table, hrf_model=hrf)
        )


def test_duplicated_events_sum_modulations(events: pd.DataFrame) -> None:
    table = pd.concat([events, events.iloc[:3]], ignore_index=True)
    times = frame_times(90, 2.0)
    with pytest.warns(BigGLMWarning, match="3 duplicated events"):
        ours = make_design(times, table)
    assert_same_design(ours, nilearn_design(times, table))


def test_missing_trial_type_is_dummy(events: pd.DataFrame) -> None:
    table = events.drop(columns="trial_type")
    times = frame_times(90, 2.0)
    ours = make_design(times, table)
    assert ours.columns[0] == "dummy"
    assert_same_design(ours, nilearn_design(times, table))


@pytest.mark.parametrize(
    "drift",
    [
        {"drift": "cosine", "high_pass": 0.01},
        {"drift": "cosine", "high_pass": 0.033},
        {"drift": "polynomial", "drift_order": 1},
        {"drift": "polynomial", "drift_order": 4},
        {"drift": None},
    ],
)
@pytest.mark.parametrize("n_scans", [150, 301])
def test_drift_models(events: pd.DataFrame, drift: dict[str, Any], n_scans: int) -> None:
    times = frame_times(n_scans, 1.2)
    theirs_kwargs = {("drift_model" if k == "drift" else k): v for k, v in drift.items()}
    ours = make_design(times, events, **drift)
    assert_same_design(ours, nilearn_design(times, events, **theirs_kwargs))


def test_no_events(events: pd.DataFrame) -> None:
    times = frame_times(60, 2.0)
    assert_same_design(make_design(times), nilearn_design(times, None))


def test_confounds_go_between_events_and_drifts(events: pd.DataFrame) -> None:
    times = frame_times(90, 2.0)
    rng = np.random.default_rng(3)
    table = pd.DataFrame(rng.normal(size=(90, 3)), columns=["trans_x", "rot_z", "csf"])
    ours = make_design(times, events, confounds=table)
    assert_same_design(ours, nilearn_design(times, events, add_regs=table))
    array = rng.normal(size=(90, 2))
    ours = make_design(times, events, confounds=array)
    assert_same_design(ours, nilearn_design(times, events, add_regs=array))
    assert ["reg0", "reg1"] == list(ours.columns[3:5])


@pytest.mark.parametrize("kernel", [SEED_POWER])
def test_user_callable(events: pd.DataFrame, kernel: Callable[[float, int], Any]) -> None:
    times = frame_times(90, 2.0)
    ours = make_design(times, events, hrf=kernel, oversampling=20)
    theirs = nilearn_design(times, events, hrf_model=kernel, oversampling=20)
    assert_same_design(ours, theirs)
    assert ours.columns[0] == "faces_seed_power"


def test_irregular_frame_times(events: pd.DataFrame) -> None:
    """nilearn takes the smallest frame interval as the TR; so does bigglm."""
    times = np.cumsum(np.r_[0.0, np.full(40, 2.0), np.full(40, 2.5)])
    assert_same_design(make_design(times, events), nilearn_design(times, events))


# --- documented differences -------------------------------------------------------------


def test_early_events_are_left_out_unlike_nilearn() -> None:
    """nilearn warns that events before frame_times[0] + min_onset are "not considered"
    but moves them to its grid start, where they still shape the regressor; bigglm
    leaves them out, as both documentations say."""
    table = pd.DataFrame({"onset": [-30.0, 20.0], "duration": [10.0, 2.0], "trial_type": "a"})
    times = frame_times(40, 2.0)
    with pytest.warns(BigGLMWarning, match="start before -24 s"):
        ours = make_design(times, table, drift=None)
    theirs = nilearn_design(times, table, drift_model=None)
    alone = nilearn_design(times, table.iloc[1:], drift_model=None)
    assert_same_design(ours, alone)
    assert np.abs(theirs["a"] - alone["a"]).max() > 1e-3  # nilearn keeps the early event


def test_rank_deficient_design_names_the_columns(events: pd.DataFrame) -> None:
    """nilearn nudges the singular values of a singular design (by ~1e-15 of the largest)
    and warns "Matrix is singular"; bigglm leaves the design exactly as built and names
    the dependent columns. The values agree to the 1e-6 criterion."""
    times = frame_times(90, 2.0)
    table = pd.DataFrame({"copy_of_constant": np.ones(90)})
    with pytest.warns(BigGLMWarning, match="'copy_of_constant' ~ 'constant'"):
        ours = make_design(times, events, confounds=table, drift=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = make_first_level_design_matrix(times, events, add_regs=table, drift_model=None)
    assert any("singular" in str(w.message) for w in caught)
    np.testing.assert_array_equal(ours["copy_of_constant"], 1.0)
    assert_same_design(ours, theirs)


# --- property-based agreement -----------------------------------------------------------

event_rows = st.lists(
    st.tuples(
        st.floats(0.0, 150.0),  # onset
        st.one_of(st.just(0.0), st.floats(0.0, 30.0)),  # duration
        st.sampled_from(["a", "b", "c d"]),  # trial_type
        st.floats(0.1, 3.0).flatmap(lambda m: st.sampled_from([m, -m])),  # modulation
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=event_rows,
    tr=st.sampled_from([0.7, 1.0, 2.0, 2.5]),
    oversampling=st.sampled_from([1, 5, 16, 50]),
    slice_time_ref=st.sampled_from([0.0, 0.5]),
    hrf=st.sampled_from(["spm", "glover + derivative", "spm + derivative + dispersion"]),
)
def test_random_events_agree_with_nilearn(
    rows: list[tuple[float, float, str, float]],
    tr: float,
    oversampling: int,
    slice_time_ref: float,
    hrf: str,
) -> None:
    table = pd.DataFrame(rows, columns=["onset", "duration", "trial_type", "modulation"])
    table = table.drop_duplicates(["onset", "duration", "trial_type"])
    times = frame_times(int(160 / tr), tr, slice_time_ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = make_design(times, table, hrf=hrf, oversampling=oversampling)
    # nilearn regularises rank-deficient designs (tested above): compare full-rank ones
    assume(not any("rank deficient" in str(w.message) for w in caught))
    theirs = nilearn_design(times, table, hrf_model=hrf, oversampling=oversampling)
    assert_same_design(ours, theirs)


def test_list_of_callables(events: pd.DataFrame) -> None:
    """Several user kernels: one column each, later ones orthogonalised to earlier ones."""
    times = frame_times(90, 2.0, 0.5)
    models = [SEED_GAMMA, SEED_POWER]
    ours = make_design(times, events, hrf=models, oversampling=10)
    theirs = nilearn_design(times, events, hrf_model=models, oversampling=10)
    assert_same_design(ours, theirs)
    assert list(ours.columns[:2]) == ["faces_seed_gamma", "faces_seed_power"]
