"""The YAML analysis configuration: schema, loading, and readable validation errors.

A configuration has six sections::

    inputs:    # a BIDS derivatives folder (with filters) or an explicit list of runs
    model:     # hrf, drift, high_pass, noise, slice_time_ref, ...
    contrasts: # name: "expression" (t) or name: [rows...] (F); see bigglm.glm.contrasts
    outputs:   # folder, which maps, residuals (off by default)
    store:     # where the Zarr stores go, chunking
    cluster:   # local (default), address, slurm, pbs or sge

Every problem is reported as a :class:`~bigglm.exceptions.ConfigError` whose message gives
the field path, what was found and how to fix it, for example ``model.noise: 'ar 1' is not
a noise model; use 'ols' or 'arN' (e.g. 'ar1')``. Unknown keys are rejected with a
did-you-mean. Relative paths are resolved against the folder of the YAML file.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bigglm.design.options import (
    check_drift_order,
    check_fir_delays,
    check_high_pass,
    check_min_onset,
    check_oversampling,
    check_tr,
)
from bigglm.exceptions import ConfigError, not_a_regular_file
from bigglm.glm.noise import noise_order
from bigglm.typing import ClusterKind, DriftModel, HRFName, ResidualFormat

__all__ = [
    "AnalysisConfig",
    "BIDSInputs",
    "ClusterConfig",
    "Inputs",
    "ModelConfig",
    "OutputsConfig",
    "ResidualsConfig",
    "RunInput",
    "StoreConfig",
    "SubmitConfig",
    "load_config",
    "parse_config",
    "parse_section",
    "walltime_seconds",
]

#: Statistical maps an analysis can write for each contrast; ``stat`` is the contrast's t or
#: F map, written as ``stat-t`` or ``stat-F`` (:func:`bigglm.glm.contrasts.map_file_name`).
MapName = Literal["effect", "variance", "stat", "p", "z"]

_DEFAULT_MAPS: tuple[MapName, ...] = ("effect", "variance", "stat", "z")
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_WHAT = {"sub": "subject", "ses": "session", "task": "task"}
_S = typing.TypeVar("_S", bound=BaseModel)
_DESIGN_CHECKS: dict[str, typing.Callable[[Any], Any]] = {
    "high_pass": check_high_pass,
    "drift_order": check_drift_order,
    "fir_delays": check_fir_delays,
    "oversampling": check_oversampling,
    "min_onset": check_min_onset,
}


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the config file's folder (the validation context)."""
    base = (info.context or {}).get("base")
    path = path.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


#: A filesystem path; relative paths are taken from the YAML file's folder.
ConfigPath = Annotated[Path, AfterValidator(_resolve)]


def _labels(value: Any, what: str) -> Any:
    """Accept one label or a list of them; refuse numbers, which YAML strips of leading zeros."""
    if value is None:
        return None
    items = [value] if isinstance(value, str | int) else value
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str):
            raise ValueError(
                f"{item!r} is a number; quote {_WHAT[what]} labels (e.g. '0{item}' or '{item}') "
                "so YAML keeps leading zeros"
            )
        label = item.split("-", 1)[1] if item.startswith(f"{what}-") else item
        if not _LABEL.match(label):
            raise ValueError(
                f"{item!r} is not a BIDS {_WHAT[what]} label; use letters and digits only"
            )
        out.append(label)
    return out


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, values are immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BIDSInputs(_Section):
    """A BIDS derivatives folder (fMRIPrep layout) and the runs to take from it."""

    derivatives: ConfigPath
    raw: ConfigPath | None = None
    subjects: list[str] | None = None
    sessions: list[str] | None = None
    tasks: list[str] | None = None
    runs: list[str] | None = None
    space: str | None = None

    @field_validator("subjects", "sessions", "tasks", mode="before")
    @classmethod
    def _entity_labels(cls, value: Any, info: ValidationInfo) -> Any:
        what = {"subjects": "sub", "sessions": "ses", "tasks": "task"}[str(info.field_name)]
        return _labels(value, what)

    @field_validator("runs", mode="before")
    @classmethod
    def _run_labels(cls, value: Any) -> Any:
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        return [str(int(str(item).removeprefix("run-"))) for item in items]


class RunInput(_Section):
    """One run given explicitly: its bold series and the files that go with it."""

    bold: ConfigPath
    events: ConfigPath | None = None
    confounds: ConfigPath | None = None
    mask: ConfigPath | None = None
    tr: Annotated[float, AfterValidator(check_tr)] | None = None
    subject: str | None = None
    task: str | None = None

    @field_validator("subject", "task", mode="before")
    @classmethod
    def _label(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        what = "sub" if info.field_name == "subject" else "task"
        return _labels(value, what)[0]


class Inputs(_Section):
    """Where the data come from: ``bids`` or ``runs`` (exactly one), plus shared options.

    ``confounds`` lists the confound columns to use (names or globs such as ``trans_*``);
    when it is empty the confounds files are not used. Every run must then have a
    confounds file, unless ``confounds_required`` is false (runs without one are fitted
    without confounds, with a warning naming them). ``mask`` replaces every run's mask.
    """

    bids: BIDSInputs | None = None
    runs: list[RunInput] | None = None
    confounds: list[str] = Field(default_factory=list)
    confounds_required: bool = True
    mask: ConfigPath | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Inputs:
        if (self.bids is None) == (self.runs is None):
            raise ValueError(
                "give exactly one of 'bids' (a derivatives folder) or 'runs' (a list of files)"
            )
        if self.runs is not None and not self.runs:
            raise ValueError("'runs' is empty; list at least one run with its 'bold' file")
        if not self.confounds_required and not self.confounds:
            raise ValueError(
                "'confounds_required: false' but no 'confounds' columns are listed; list the "
                "columns (e.g. confounds: [trans_*, rot_*]) or drop 'confounds_required'"
            )
        return self


class ModelConfig(_Section):
    """The first-level model; names and meanings follow nilearn's design options.

    Numbers are checked by the functions :func:`bigglm.design.make_design` uses
    (:mod:`bigglm.design.options`, :func:`bigglm.glm.noise.noise_order`), so a config
    accepts exactly what the Python API accepts; the checks that need a run's length
    (grid size, drift order, AR order against the scans) run in ``bigglm validate``.
    """

    hrf: HRFName = "glover"
    drift: DriftModel | None = "cosine"
    high_pass: float = 0.01
    drift_order: int = 1
    fir_delays: list[int] | None = None
    noise: str = "ar1"
    slice_time_ref: float | None = Field(default=None, ge=0.0, le=1.0)
    oversampling: int = 50
    min_onset: float = -24.0

    @field_validator("noise", mode="before")
    @classmethod
    def _noise(cls, value: Any) -> Any:
        noise_order(value)
        return value

    @field_validator("high_pass", "drift_order", "fir_delays", "oversampling", "min_onset")
    @classmethod
    def _design_option(cls, value: Any, info: ValidationInfo) -> Any:
        return _DESIGN_CHECKS[str(info.field_name)](value)


class ResidualsConfig(_Section):
    """Residual time series, one file per run: a second pass over the data, so off by default.

    ``whitened``: false for ``Y - X beta``, true for the AR-whitened residuals;
    ``format``: ``nifti`` (a 4D ``.nii.gz``) or ``zarr`` (a store like the input's).
    """

    whitened: bool = False
    format: ResidualFormat = "nifti"


class OutputsConfig(_Section):
    """Where results go, which maps are written for each contrast, an HTML report, and
    (``residuals: true`` or a mapping of :class:`ResidualsConfig`) residuals per run."""

    folder: ConfigPath
    maps: list[MapName] = Field(default_factory=lambda: list(_DEFAULT_MAPS))
    report: bool = True
    residuals: ResidualsConfig | None = None

    @field_validator("residuals", mode="before")
    @classmethod
    def _residuals_switch(cls, value: Any) -> Any:
        """``true`` means the defaults, ``false`` none."""
        if isinstance(value, bool):
            return {} if value else None
        return value


class StoreConfig(_Section):
    """Where the Zarr stores go (default ``<outputs.folder>/stores``) and their time chunk."""

    folder: ConfigPath | None = None
    time_chunk: PositiveInt | None = None


class SubmitConfig(_Section):
    """Resources of the batch job(s) that ``bigglm submit`` creates."""

    mode: Literal["driver", "array"] = "driver"
    cores: PositiveInt = 1
    memory: str = "4GB"
    walltime: str = "01:00:00"

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        return _check_memory(value)

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        walltime_seconds(value)
        return value


class ClusterConfig(_Section):
    """A Dask cluster profile: ``local``, ``address``, or a batch system via dask-jobqueue.

    ``tune_malloc`` (local and batch profiles, default true): the worker processes bigglm
    starts begin with glibc malloc thresholds at 32 MiB and run a valve that hands free
    memory back near their memory limit (:mod:`bigglm.worker_memory`); false leaves
    distributed's settings.
    """

    profile: ClusterKind = "local"
    # local
    n_workers: PositiveInt | None = None
    threads_per_worker: PositiveInt | None = None
    memory_limit: str | None = None
    # address
    address: str | None = None
    # slurm / pbs / sge
    jobs: PositiveInt = 1
    cores: PositiveInt = 1
    processes: PositiveInt = 1
    memory: str = "4GB"
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    job_extra_directives: list[str] = Field(default_factory=list)
    local_directory: str | None = None
    log_directory: str | None = None
    interface: str | None = None
    python: str | None = None
    submit: SubmitConfig = Field(default_factory=SubmitConfig)
    # local and batch: the clusters bigglm starts
    tune_malloc: bool = Field(
        default=True,
        description=(
            "Start bigglm's worker processes with glibc malloc thresholds at 32 MiB and a "
            "valve that hands free memory back near their limit; false keeps distributed's."
        ),
    )

    @field_validator("memory", "memory_limit")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        return None if value is None else _check_memory(value)

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        walltime_seconds(value)
        return value

    @model_validator(mode="after")
    def _fits_profile(self) -> ClusterConfig:
        if self.profile == "address" and not self.address:
            raise ValueError(
                "profile 'address' needs 'address', the scheduler's address "
                "(e.g. 'tcp://10.0.0.5:8786')"
            )
        if self.address and self.profile != "address":
            raise ValueError(f"'address' is only used with profile 'address', not {self.profile!r}")
        if self.profile == "address" and "tune_malloc" in self.model_fields_set:
            raise ValueError(
                "tune_malloc only applies to clusters bigglm starts (local, slurm, pbs, sge); "
                "a scheduler joined by 'address' keeps its workers' settings; remove it"
            )
        batch = {"jobs", "cores", "processes", "memory", "walltime", "queue", "account"}
        batch |= {"job_extra_directives", "interface", "python"}
        misplaced = sorted(batch & self.model_fields_set) if self.profile == "local" else []
        if misplaced:
            raise ValueError(
                f"{', '.join(misplaced)} only apply to batch profiles (slurm, pbs, sge); "
                "set 'profile' or remove them"
            )
        return self


class AnalysisConfig(_Section):
    """A whole first-level analysis, as read from YAML."""

    inputs: Inputs
    model: ModelConfig = Field(default_factory=ModelConfig)
    contrasts: dict[str, str | list[str]] = Field(default_factory=dict)
    outputs: OutputsConfig
    store: StoreConfig = Field(default_factory=StoreConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    #: The YAML file it was read from (:func:`load_config`); None when built in Python.
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The YAML file this configuration was read from, or None."""
        return self._source

    @field_validator("contrasts")
    @classmethod
    def _contrast_names(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        from bigglm.glm.contrasts import check_names

        for name, expression in value.items():
            if not _NAME.match(name):
                raise ValueError(
                    f"contrast name {name!r} is used in file names; use letters, digits and "
                    "'_' only, starting with a letter (e.g. 'faces_minus_houses')"
                )
            rows = [expression] if isinstance(expression, str) else expression
            if not rows or not all(row.strip() for row in rows):
                raise ValueError(f"contrast {name!r} is empty; give an expression like 'a - b'")
        check_names(value)  # labels that collide (faces_minus_houses, facesMinusHouses)
        return value

    @property
    def store_folder(self) -> Path:
        """The folder for Zarr stores: ``store.folder`` or ``<outputs.folder>/stores``."""
        return self.store.folder or self.outputs.folder / "stores"


def _check_memory(value: str) -> str:
    from dask.utils import parse_bytes

    try:
        parse_bytes(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an amount of memory; write it like '4GB' or '500MiB'"
        ) from None
    return value


def walltime_seconds(walltime: str) -> int:
    """Convert a batch walltime (``[D-]HH:MM:SS``) to seconds.

    Parameters
    ----------
    walltime : str
        ``"HH:MM:SS"`` or ``"D-HH:MM:SS"``.

    Returns
    -------
    int
        The duration in seconds.

    Raises
    ------
    ValueError
        If the text is not a walltime.

    Examples
    --------
    >>> walltime_seconds("01:30:00")
    5400
    >>> walltime_seconds("1-00:00:00")
    86400
    """
    match = _WALLTIME.match(walltime.strip())
    if match is None:
        raise ValueError(
            f"{walltime!r} is not a walltime; write it as 'HH:MM:SS' (e.g. '02:00:00')"
        )
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_config(data: Mapping[str, Any], *, base: str | Path | None = None) -> AnalysisConfig:
    """Validate a configuration mapping (the parsed YAML).

    Parameters
    ----------
    data : Mapping
        The configuration, as read from YAML.
    base : str or Path, optional
        Folder that relative paths are resolved against (the YAML file's folder).

    Returns
    -------
    AnalysisConfig
        The validated, immutable configuration.

    Raises
    ------
    ConfigError
        One message listing every problem by field path, with the fix.

    Examples
    --------
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "/data/bold.nii.gz"}]},
    ...                     "outputs": {"folder": "/results"}})
    >>> cfg.model.noise, cfg.cluster.profile
    ('ar1', 'local')
    >>> parse_config({"inputs": {"runs": [{"bold": "b.nii"}]}, "outputs": {"folder": "o"},
    ...               "model": {"noise": "ar 1"}})
    Traceback (most recent call last):
    ...
    bigglm.exceptions.ConfigError: model.noise: 'ar 1' is not a noise model; use 'ols' or 'arN' ...
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"the configuration must be a mapping of sections (inputs, model, contrasts, "
            f"outputs, store, cluster), not a {type(data).__name__}"
        )
    context = {"base": Path(base) if base is not None else None}
    try:
        return AnalysisConfig.model_validate(dict(data), context=context)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping.

    Plain YAML keeps the last of two equal keys, so a second ``model:`` silently
    replaced the first; here it is an error with the line of each.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` may override
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # unhashable: SafeLoader reports it
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping (lines {first.line + 1} and "
                    f"{key_node.start_mark.line + 1}); the later would replace the earlier, "
                    "so merge them into one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def parse_section(section: type[_S], data: Mapping[str, Any]) -> _S:
    """Validate one section (e.g. :class:`ModelConfig`) from options given outside a YAML.

    Parameters
    ----------
    section : type
        A section model, such as :class:`ModelConfig` or :class:`ClusterConfig`.
    data : Mapping
        Its fields.

    Returns
    -------
    The validated section.

    Raises
    ------
    ConfigError
        Every problem as ``field: what was found; how to fix it``.

    Examples
    --------
    >>> parse_section(ModelConfig, {"noise": "ols"}).noise
    'ols'
    >>> parse_section(ModelConfig, {"hrf": "spam"})
    Traceback (most recent call last):
    ...
    bigglm.exceptions.ConfigError: hrf: 'spam' is not allowed; use one of 'spm', ...
    """
    try:
        return section.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_config(path: str | Path) -> AnalysisConfig:
    """Read and validate a YAML analysis configuration.

    Parameters
    ----------
    path : str or Path
        The YAML file. Relative paths inside it are taken from its folder.

    Returns
    -------
    AnalysisConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        If the file is missing, is not valid YAML (a key given twice in one mapping
        included), or does not match the schema; the message starts with the file name
        and gives the field path and the fix.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.yaml").write_text(
    ...     "inputs: {runs: [{bold: bold.nii.gz}]}\\noutputs: {folder: out}\\n")
    >>> load_config(folder / "a.yaml").outputs.folder == folder / "out"
    True
    """
    path = Path(path)
    problem = not_a_regular_file(path)
    if problem not in (None, "does not exist"):  # a FIFO would block the read
        raise ConfigError(f"{path}: cannot read the configuration (it {problem})")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the configuration ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from None
    try:
        config = parse_config(data if data is not None else {}, base=path.parent.resolve())
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    config._source = path.resolve()
    return config


# --- turning pydantic's errors into messages with the fix ------------------------------------


def _explain(err: ValidationError) -> str:
    """One line for every error: ``path: what was found; how to fix it``."""
    return "; ".join(_explain_one(e) for e in err.errors(include_url=False))


def _explain_one(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    where = _path(loc) or "config"
    value = error.get("input")
    if kind == "missing":
        return f"{where}: required but missing; add it"
    if kind == "literal_error":
        allowed = [a.strip().strip("'") for a in re.split(r",| or ", error["ctx"]["expected"])]
        allowed = [a for a in allowed if a]
        hint = _did_you_mean(str(value), allowed)
        return (
            f"{where}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}{hint}"
        )
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind in {"value_error", "assertion_error"}:
        return f"{where}: {message}"
    return f"{where}: {message[0].lower()}{message[1:]} (got {value!r})"


def _path(loc: Sequence[Any]) -> str:
    """``("inputs", "runs", 0, "bold")`` -> ``"inputs.runs[0].bold"``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif str(part).startswith(("function-", "union[", "list[", "str")):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text


def _unknown_key(loc: Sequence[Any]) -> str:
    key = str(loc[-1])
    model = _model_at(AnalysisConfig, loc[:-1])
    allowed = list(model.model_fields) if model is not None else []
    where = _path(loc[:-1])
    prefix = f"{where}: " if where else ""
    hint = _did_you_mean(key, allowed)
    if not hint and allowed:
        hint = f" (allowed: {', '.join(allowed)})"
    return f"{prefix}unknown key {key!r}{hint}"


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_at(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model that a location inside ``model`` points into, if any."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """Unwrap ``X | None`` and ``list[X]`` down to a model class ``X`` (or return as is)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if isinstance(found, type) and issubclass(found, BaseModel):
                return found
    return annotation
