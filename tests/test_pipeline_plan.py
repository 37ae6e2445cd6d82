"""Planning checks that need no voxel data: requested confounds must exist for every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bigglm.config import parse_config
from bigglm.exceptions import BigGLMWarning, ConfigError, DesignError
from bigglm.pipeline import plan

_CONFOUNDS = "derivatives/sub-02/func/sub-02_task-tiny_desc-confounds_timeseries.tsv"


def _config(tiny_config: Any, dataset: Path, tmp_path: Path, **inputs: Any) -> Any:
    cfg = tiny_config(dataset, tmp_path / "out")
    cfg["inputs"] = {**cfg["inputs"], "confounds": ["trans_*", "rot_*"], **inputs}
    return parse_config(cfg)


def test_requested_confounds_without_a_confounds_file_are_an_error(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path
) -> None:
    (tiny_bids / _CONFOUNDS).unlink()
    with pytest.raises(ConfigError, match=r"sub-02_task-tiny.*desc-confounds_timeseries\.tsv"):
        plan(_config(tiny_config, tiny_bids, tmp_path))


def test_explicit_runs_without_confounds_are_an_error(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path
) -> None:
    bold = tiny_bids / "derivatives/sub-01/func/sub-01_task-tiny_desc-preproc_bold.nii.gz"
    events = tiny_bids / "raw/sub-01/func/sub-01_task-tiny_events.tsv"
    runs = [{"bold": str(bold), "events": str(events)}]
    config = _config(tiny_config, tiny_bids, tmp_path, bids=None, runs=runs)
    with pytest.raises(ConfigError, match=r"sub-01_task-tiny.*'confounds' file.*inputs\.runs"):
        plan(config)


def test_optional_confounds_warn_and_fit_those_runs_without_them(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path
) -> None:
    (tiny_bids / _CONFOUNDS).unlink()
    config = _config(tiny_config, tiny_bids, tmp_path, confounds_required=False)
    with pytest.warns(BigGLMWarning, match=r"sub-02_task-tiny") as caught:
        first, second = plan(config)
    assert "sub-01_task-tiny" not in str(caught[0].message)
    assert {"trans_x", "rot_x"} <= set(first.runs[0].design.columns)
    assert not {"trans_x", "rot_x"} & set(second.runs[0].design.columns)


def test_optional_confounds_need_confound_columns(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_bids, tmp_path / "out")
    cfg["inputs"] = {**cfg["inputs"], "confounds": [], "confounds_required": False}
    with pytest.raises(ConfigError, match="confounds_required"):
        parse_config(cfg)


def test_a_confound_pattern_matching_no_column_is_an_error(
    tiny_config: Any, tiny_bids: Path, tmp_path: Path
) -> None:
    config = _config(tiny_config, tiny_bids, tmp_path)
    config = config.model_copy(
        update={"inputs": config.inputs.model_copy(update={"confounds": ["trans_*", "csf"]})}
    )
    with pytest.raises(DesignError, match=r"sub-01_task-tiny.*no column matching 'csf'"):
        plan(config)
