"""Numeric design options: one set of checks for the API, the YAML config and the CLI."""

from __future__ import annotations

import math
import time
from typing import Any

import pandas as pd
import pytest

from bigglm.config import ModelConfig, parse_section
from bigglm.design import frame_times, make_design, make_run_design
from bigglm.design.options import MAX_GRID_SAMPLES
from bigglm.exceptions import ConfigError, DesignError

EVENTS = pd.DataFrame({"onset": [4.0, 30.0], "duration": [8.0, 8.0], "trial_type": ["a", "b"]})

#: (option, bad value, fragment of the message). Each broke a run (traceback, MemoryError,
#: a hang) or silently changed the model before the options were checked.
BAD = [
    ("high_pass", 1e308, "Nyquist"),
    ("high_pass", -1.0, "must be positive"),
    ("high_pass", 0.0, "must be positive"),  # used to drop the drift terms silently
    ("high_pass", math.inf, "not a finite number"),
    ("oversampling", 10**12, "out of range"),
    ("oversampling", 0, "out of range"),
    ("drift_order", 100000, "needs more than 100000 scans"),
    ("fir_delays", [-1, 2], "-1 is negative"),
    ("fir_delays", [0, 0], "repeat a delay"),
    ("min_onset", math.nan, "not a finite number"),
]


@pytest.mark.parametrize(("option", "value", "fragment"), BAD)
def test_the_api_refuses_bad_options(option: str, value: Any, fragment: str) -> None:
    model: dict[str, Any] = {option: value}
    if option == "drift_order":
        model["drift"] = "polynomial"
    if option == "fir_delays":
        model["hrf"] = "fir"
    started = time.perf_counter()
    with pytest.raises(DesignError, match=fragment):
        make_run_design(40, 2.0, events=EVENTS, **model)
    assert time.perf_counter() - started < 5  # drift_order=100000 used to hang


#: Bad only against the run (its TR or length): refused by validate (tests/test_cli.py).
NEEDS_THE_RUN = [("high_pass", 1e308), ("drift_order", 100000)]


@pytest.mark.parametrize(
    ("option", "value", "fragment"), [b for b in BAD if b[:2] not in NEEDS_THE_RUN]
)
def test_the_config_refuses_the_same_options(option: str, value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{option}: .*{fragment}"):
        parse_section(ModelConfig, {option: value})


@pytest.mark.parametrize("tr", [1e300, 0.0, -2.0, math.inf, 2000.0])
def test_tr_out_of_range_is_refused(tr: float) -> None:
    with pytest.raises(DesignError, match="tr="):
        frame_times(40, tr)


def test_the_grid_is_bounded_even_when_oversampling_is_allowed() -> None:
    oversampling = MAX_GRID_SAMPLES // 10  # a valid option, but 40 scans make a huge grid
    with pytest.raises(DesignError, match="convolution grid would have"):
        make_design(frame_times(40, 2.0), EVENTS, oversampling=oversampling)


@pytest.mark.parametrize("noise", ["ar0", "ar", "AR1", "ols1"])
def test_noise_models_are_refused_in_the_config_words(noise: str) -> None:
    with pytest.raises(ConfigError, match=rf"^noise: '{noise}' is not a noise model"):
        parse_section(ModelConfig, {"noise": noise})


def test_hrf_error_is_the_human_text_not_a_pydantic_url() -> None:
    with pytest.raises(ConfigError) as info:
        parse_section(ModelConfig, {"hrf": "spam"})
    assert "errors.pydantic.dev" not in str(info.value)
    assert str(info.value).startswith("hrf: 'spam' is not allowed; use one of 'spm'")
