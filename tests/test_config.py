"""The YAML schema: valid configs load; every mistake gives the field path and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigglm.config import AnalysisConfig, load_config, parse_config, walltime_seconds
from bigglm.exceptions import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"inputs": {"runs": [{"bold": "bold.nii.gz"}]}, "outputs": {"folder": "out"}}


def _error(**sections: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, **sections})
    return str(info.value)


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse_config(MINIMAL, base="/data")
    assert config.model.noise == "ar1"
    assert config.model.hrf == "glover"
    assert config.model.high_pass == 0.01
    assert config.cluster.profile == "local"
    assert config.cluster.tune_malloc is True
    assert config.inputs.runs is not None
    assert config.inputs.runs[0].bold == Path("/data/bold.nii.gz")
    assert config.store_folder == Path("/data/out/stores")


def test_malloc_tuning_can_be_turned_off() -> None:
    config = parse_config({**MINIMAL, "cluster": {"profile": "slurm", "tune_malloc": False}})
    assert config.cluster.tune_malloc is False


def test_noise_error_names_the_field_and_the_fix() -> None:
    message = _error(model={"noise": "ar 1"})
    assert message == (
        "model.noise: 'ar 1' is not a noise model; use 'ols', 'arN' (e.g. 'ar1'), "
        "'spm-ar1' or 'film'"
    )


@pytest.mark.parametrize("noise", ["ols", "ar1", "ar2", "ar12"])
def test_noise_models_accepted(noise: str) -> None:
    assert parse_config({**MINIMAL, "model": {"noise": noise}}).model.noise == noise


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"model": {"nosie": "ar1"}}, "model: unknown key 'nosie'; did you mean 'noise'?"),
        ({"modle": {}}, "unknown key 'modle'; did you mean 'model'?"),
        (
            {"inputs": {"runs": [{"bold": "b.nii", "event": "e.tsv"}]}},
            "inputs.runs[0]: unknown key 'event'; did you mean 'events'?",
        ),
        (
            {"cluster": {"profile": "slurm", "memroy": "4GB"}},
            "cluster: unknown key 'memroy'; did you mean 'memory'?",
        ),
    ],
)
def test_unknown_keys_get_did_you_mean(sections: dict[str, object], expected: str) -> None:
    assert _error(**sections) == expected


def test_unknown_key_without_close_match_lists_the_allowed_ones() -> None:
    message = _error(outputs={"folder": "o", "zzz": 1})
    assert message.startswith("outputs: unknown key 'zzz' (allowed: folder, maps")


def test_literal_choices_are_listed_with_a_suggestion() -> None:
    message = _error(model={"hrf": "glovr"})
    assert message.startswith("model.hrf: 'glovr' is not allowed; use one of 'spm'")
    assert message.endswith("did you mean 'glover'?")


def test_several_errors_are_all_reported_on_one_line() -> None:
    message = _error(model={"noise": "x", "high_pass": -1})
    assert "model.noise" in message and "model.high_pass" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"inputs": {}}, "inputs: give exactly one of 'bids'"),
        ({"inputs": {"runs": []}}, "'runs' is empty"),
        ({"inputs": {"bids": {"derivatives": "d", "subjects": [1]}}}, "quote subject labels"),
        ({"cluster": {"profile": "local", "cores": 4}}, "cores only apply to batch profiles"),
        ({"cluster": {"profile": "address"}}, "profile 'address' needs 'address'"),
        (
            {"cluster": {"profile": "address", "address": "tcp://h:8786", "tune_malloc": False}},
            "tune_malloc only applies to clusters bigglm starts",
        ),
        ({"cluster": {"profile": "slurm", "walltime": "1h"}}, "cluster.walltime: '1h'"),
        ({"cluster": {"profile": "slurm", "memory": "lots"}}, "cluster.memory: 'lots'"),
        ({"contrasts": {"a-b": "a - b"}}, "contrast name 'a-b' is used in file names"),
        ({"outputs": {"folder": "o", "maps": ["zz"]}}, "outputs.maps[0]: 'zz' is not allowed"),
        ({"model": {"slice_time_ref": 2}}, "model.slice_time_ref: input should be less than"),
    ],
)
def test_mistakes_name_the_field(sections: dict[str, object], fragment: str) -> None:
    assert fragment in _error(**sections)


def test_contrast_names_whose_file_labels_collide_are_refused() -> None:
    """faces_minus_houses and facesMinusHouses would write the same files (issue item 6)."""
    message = _error(contrasts={"faces_minus_houses": "a - b", "facesMinusHouses": "a - b"})
    assert message.startswith("contrasts: ")
    assert "'faces_minus_houses' and 'facesMinusHouses' give the same file label" in message
    assert "\n" not in message


@pytest.mark.parametrize("contrast", ["", " ", [], ["a", " "]])
def test_empty_contrasts_are_refused(contrast: object) -> None:
    assert "contrast 'x' is empty" in _error(contrasts={"x": contrast})


def test_missing_section_says_add_it() -> None:
    with pytest.raises(ConfigError, match=r"^outputs: required but missing; add it$"):
        parse_config({"inputs": MINIMAL["inputs"]})


def test_bids_labels_accept_prefixes_and_single_values() -> None:
    config = parse_config(
        {**MINIMAL, "inputs": {"bids": {"derivatives": "d", "subjects": "sub-01", "runs": [1]}}}
    )
    assert config.inputs.bids is not None
    assert config.inputs.bids.subjects == ["01"]
    assert config.inputs.bids.runs == ["1"]


def test_yaml_errors_give_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("inputs:\n  runs: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        (
            "inputs: {runs: [{bold: b.nii}]}\nmodel: {noise: ols}\noutputs: {folder: o}\n"
            "model: {noise: ar1}\n",
            "model",
            (2, 4),
        ),
        ("inputs: {runs: [{bold: b.nii}]}\noutputs:\n  folder: o\n  folder: p\n", "folder", (3, 4)),
    ],
    ids=["section", "nested"],
)
def test_a_key_given_twice_is_refused_with_both_lines(
    tmp_path: Path, text: str, key: str, lines: tuple[int, int]
) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    expected = rf"twice.yaml: line {lines[1]}, .*key '{key}' appears twice .*lines {lines[0]} and"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_yaml_merge_keys_may_still_override(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "inputs: {runs: [{bold: b.nii}]}\noutputs: {folder: o}\n"
        "model: {<<: {noise: ols, hrf: spm}, noise: ar1}\n"
    )
    model = load_config(path).model
    assert (model.noise, model.hrf) == ("ar1", "spm")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "nope.yaml")


def test_errors_from_a_file_start_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("inputs: {runs: [{bold: b.nii}]}\noutputs: {folder: o}\nmodel: {noise: x}\n")
    with pytest.raises(ConfigError, match=r"a.yaml: model.noise: 'x' is not a noise model"):
        load_config(path)


def test_relative_paths_are_taken_from_the_yaml_folder(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.yaml"
    path.parent.mkdir()
    path.write_text("inputs: {runs: [{bold: ../b.nii, events: e.tsv}]}\noutputs: {folder: o}\n")
    config = load_config(path)
    assert config.inputs.runs is not None
    assert config.inputs.runs[0].bold.resolve() == (tmp_path / "b.nii").resolve()
    assert config.outputs.folder == path.parent.resolve() / "o"


@pytest.mark.parametrize(
    "name", ["demo.yaml", "local.yaml", "slurm.yaml", "pbs.yaml"], ids=lambda n: n
)
def test_shipped_example_configs_are_valid(name: str) -> None:
    assert isinstance(load_config(ROOT / "configs" / name), AnalysisConfig)


@pytest.mark.parametrize(
    ("text", "seconds"), [("00:30:00", 1800), ("2:00:00", 7200), ("1-02:00:00", 93600)]
)
def test_walltime_seconds(text: str, seconds: int) -> None:
    assert walltime_seconds(text) == seconds
