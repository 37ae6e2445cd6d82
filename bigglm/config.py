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
import math
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
from bigglm.typing import (
    ClusterKind,
    DesignConvention,
    DriftModel,
    GlobalScaling,
    HRFName,
    ResidualFormat,
)

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


_NILEARN_ONLY = ("drift", "drift_order", "fir_delays", "oversampling", "min_onset")
_SPM_ONLY = ("microtime_resolution", "microtime_onset", "units", "modulators")


def _spm_cutoff(value: Any) -> float:
    """An SPM high-pass cut-off: a period in seconds, so a value below 1 is surely Hz."""
    cutoff = float(value)
    if not math.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"high_pass {value!r} must be a positive cut-off period in seconds")
    if cutoff < 1:
        raise ValueError(
            f"high_pass {value!r}: in an SPM convention high_pass is the cut-off period in "
            f"seconds (SPM's default 128), not Hz; did you mean {1 / cutoff:g}?"
        )
    return cutoff


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
    """A BIDS derivatives folder (fMRIPrep layout) and the runs to take from it.

    ``space`` keeps one output space: a volume space (``MNI152NLin2009cAsym``, ``T1w``), or
    a surface space, whose GIFTI series (``fsaverage5``, ``fsaverage6``, ``fsnative``: the
    ``hemi-L`` and ``hemi-R`` files of a run, paired) or CIFTI-2 dense series (``fsLR``)
    are fitted instead (:func:`bigglm.bids.find_runs`). Without it, volumes only.
    """

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

    convention: DesignConvention = "nilearn"
    hrf: HRFName = "glover"
    drift: DriftModel | None = "cosine"
    high_pass: float = 0.01
    drift_order: int = 1
    fir_delays: list[int] | None = None
    noise: str = "ar1"
    slice_time_ref: float | None = Field(default=None, ge=0.0, le=1.0)
    oversampling: int = 50
    min_onset: float = -24.0
    microtime_resolution: PositiveInt = 16
    microtime_onset: PositiveInt | None = None
    units: Literal["secs", "scans"] = "secs"
    modulators: list[str] = Field(default_factory=list)
    scaling: GlobalScaling | None = None

    @field_validator("noise", mode="before")
    @classmethod
    def _noise(cls, value: Any) -> Any:
        noise_order(value)
        return value

    @field_validator("high_pass", "drift_order", "fir_delays", "oversampling", "min_onset")
    @classmethod
    def _design_option(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name == "high_pass" and str(info.data.get("convention")).startswith("spm"):
            return _spm_cutoff(value)
        return _DESIGN_CHECKS[str(info.field_name)](value)

    @model_validator(mode="after")
    def _one_convention(self) -> ModelConfig:
        """Options of the other convention are refused, not silently ignored."""
        if self.convention == "fsl":
            raise ValueError(
                "convention 'fsl' is not yet available in configs; build the design in "
                "Python with bigglm.design.make_run_design(..., convention='fsl')"
            )
        spm = self.convention.startswith("spm")
        other = _NILEARN_ONLY if spm else _SPM_ONLY
        given = sorted(set(other) & self.model_fields_set)
        if given:
            raise ValueError(
                f"{given[0]!r} is not an option of the {self.convention} convention "
                f"(options of {'nilearn' if spm else 'an SPM'} convention: {list(other)}); "
                "remove it or change 'convention'"
            )
        if spm and "hrf" in self.model_fields_set and not self.hrf.startswith("spm"):
            raise ValueError(
                f"hrf {self.hrf!r} is not an SPM basis; the {self.convention} convention "
                "builds 'spm', 'spm + derivative' or 'spm + derivative + dispersion'"
            )
        return self

    def design_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`bigglm.design.make_run_design` for this model."""
        if self.convention == "nilearn":
            names: tuple[str, ...] = ("hrf", *_NILEARN_ONLY, "high_pass")
            return {"convention": "nilearn", **{n: getattr(self, n) for n in names}}
        options = {"hrf": self.basis, **{n: getattr(self, n) for n in _SPM_ONLY}}
        options["high_pass"] = self.high_pass if "high_pass" in self.model_fields_set else 128.0
        return {"convention": self.convention, **options}

    @property
    def basis(self) -> str:
        """``hrf`` as given, else the convention's canonical response (``glover`` for
        nilearn, ``spm`` for SPM)."""
        if self.convention.startswith("spm") and "hrf" not in self.model_fields_set:
            return "spm"
        return str(self.hrf)

    @property
    def global_scaling(self) -> GlobalScaling:
        """``scaling`` as given, else SPM's session-wise grand mean scaling in an SPM
        convention (SPM always applies it) and none in nilearn's."""
        if self.scaling is not None:
            return self.scaling
        return "session" if self.convention.startswith("spm") else "none"


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


class SecurityConfig(_Section):
    """TLS for the Dask clusters bigglm starts or joins (:mod:`bigglm.security`).

    Clusters bigglm starts (``local``, ``slurm``, ``pbs``, ``sge``) use TLS with mutual
    authentication and per-run credentials unless ``tls`` is false, the documented opt-out
    for sites that keep the network private otherwise. ``directory`` (batch profiles) is
    where the per-run credentials folder is made: on a filesystem the workers share
    (default: the outputs' ``.bigglm`` folder in a workflow run, else ``~/.bigglm/credentials``).
    ``ca_file``, ``cert`` and ``key`` (``address`` profile) are the PEM files to join a TLS
    scheduler with; without them Dask's own ``distributed.comm.tls`` configuration applies.
    """

    tls: bool = True
    directory: ConfigPath | None = None
    ca_file: ConfigPath | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> SecurityConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give 'cert' and 'key' together (a certificate and its private key)")
        return self


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
    # every profile: TLS (started clusters: on by default; address: the client's files)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    # local and batch: the clusters bigglm starts
    dashboard_address: str = Field(
        default="127.0.0.1:0",
        description=(
            "Where the scheduler's dashboard listens: loopback and any free port by default "
            "(reach it with ssh -L); ':8787' would open it to the whole network."
        ),
    )
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
        self._security_fits_profile()
        batch = {"jobs", "cores", "processes", "memory", "walltime", "queue", "account"}
        batch |= {"job_extra_directives", "interface", "python"}
        misplaced = sorted(batch & self.model_fields_set) if self.profile == "local" else []
        if misplaced:
            raise ValueError(
                f"{', '.join(misplaced)} only apply to batch profiles (slurm, pbs, sge); "
                "set 'profile' or remove them"
            )
        return self

    def _security_fits_profile(self) -> None:
        given = self.security.model_fields_set
        if self.profile == "address":
            started = sorted(given & {"tls", "directory"})
            if started or "dashboard_address" in self.model_fields_set:
                names = ", ".join(f"security.{n}" for n in started) or "dashboard_address"
                raise ValueError(
                    f"{names} only apply to clusters bigglm starts; a scheduler joined by "
                    "'address' uses a tls:// address and security's ca_file, cert and key"
                )
            return
        joined = sorted(given & {"ca_file", "cert", "key"})
        if joined:
            raise ValueError(
                f"security.{', security.'.join(joined)} only apply to profile 'address'; "
                f"a {self.profile} cluster makes its own credentials for each run"
            )
        if self.profile == "local" and "directory" in given:
            raise ValueError(
                "security.directory only applies to batch profiles (slurm, pbs, sge); a "
                "local cluster keeps its credentials in memory"
            )


class PermutationConfig(_Section):
    """Permutation inference of each group contrast (:func:`bigglm.inference.permutation_test`).

    ``cluster_threshold`` is the cluster-forming threshold as an uncorrected one-sided p
    value (converted to t with each test's degrees of freedom), for cluster extent and
    mass FWE p values; ``seed`` is fixed by default so that a rerun gives the same p
    values (and a resumed workflow reuses them).
    """

    n_perm: PositiveInt = 10000
    tfce: bool = False
    cluster_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    two_sided: bool = False
    seed: int = 0


class GroupInferenceConfig(_Section):
    """How group maps are thresholded: parametric (``height_control``, ``alpha``,
    ``cluster_threshold`` in voxels, as nilearn's ``threshold_stats_img``) and, when
    ``permutation`` is given, permutation tests with FWE-corrected maps."""

    height_control: Literal["fpr", "fdr", "bonferroni"] | None = "fpr"
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.001
    cluster_threshold: Annotated[int, Field(ge=0)] = 0
    two_sided: bool = True
    permutation: PermutationConfig | None = None


class GroupConfig(_Section):
    """The group level of a study: which first-level contrasts go up, the design, the model.

    ``participants``: the table of subjects (default: ``participants.tsv`` of the BIDS
    raw folder, else of the derivatives folder); not needed for an intercept-only design.
    ``design``: columns of that table (``intercept`` is the column of ones) or a Wilkinson
    formula (``"1 + age + C(group)"``), by :func:`bigglm.group.design`. ``inputs``: the
    first-level t contrasts taken to the group level (default: every t contrast).
    ``contrasts``: over the design's columns (default: ``mean: intercept``). ``report``:
    an HTML report per first-level contrast (``group_report.html``).
    """

    participants: ConfigPath | None = None
    design: str | list[str] = Field(default_factory=lambda: ["intercept"])
    model: Literal["ols", "mixed"] = "ols"
    min_subjects: PositiveInt | None = None
    inputs: list[str] | None = None
    contrasts: dict[str, str] = Field(default_factory=lambda: {"mean": "intercept"})
    inference: GroupInferenceConfig = Field(default_factory=GroupInferenceConfig)
    report: bool = True

    @field_validator("contrasts")
    @classmethod
    def _contrast_names(cls, value: dict[str, str]) -> dict[str, str]:
        from bigglm.glm.contrasts import check_names

        if not value:
            raise ValueError("give at least one group contrast, e.g. {mean: intercept}")
        for name in value:
            if not _NAME.match(name):
                raise ValueError(
                    f"group contrast name {name!r} is used in file names; use letters, "
                    "digits and '_' only, starting with a letter (e.g. 'patients_minus_controls')"
                )
        check_names(value)
        return value


class AnalysisConfig(_Section):
    """A whole study, as read from YAML: the first level and, optionally, the group level."""

    inputs: Inputs
    model: ModelConfig = Field(default_factory=ModelConfig)
    contrasts: dict[str, str | list[str]] = Field(default_factory=dict)
    outputs: OutputsConfig
    store: StoreConfig = Field(default_factory=StoreConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    group: GroupConfig | None = None
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

    @model_validator(mode="after")
    def _group_inputs(self) -> AnalysisConfig:
        if self.group is None:
            return self
        from bigglm.glm.contrasts import default_kind

        for name in self.group.inputs or []:
            if name not in self.contrasts:
                known = ", ".join(self.contrasts) or "none"
                raise ValueError(
                    f"group.inputs: {name!r} is not a first-level contrast (contrasts: {known})"
                )
            if default_kind(self.contrasts[name]) != "t":
                raise ValueError(
                    f"group.inputs: {name!r} is an F contrast; the group level takes t "
                    "contrasts (one effect per subject)"
                )
        missing = [m for m in ("effect", "variance") if m not in self.outputs.maps]
        if missing:
            raise ValueError(
                f"the group level reads each subject's effect and variance maps; add "
                f"{' and '.join(missing)} to outputs.maps"
            )
        if not self.group_inputs:
            raise ValueError("group: no first-level t contrast to take up; add one to contrasts")
        return self

    @property
    def group_inputs(self) -> list[str]:
        """The first-level contrasts the group level takes: ``group.inputs``, else every
        t contrast (none without a ``group`` section)."""
        from bigglm.glm.contrasts import default_kind

        if self.group is None:
            return []
        if self.group.inputs is not None:
            return list(self.group.inputs)
        return [n for n, e in self.contrasts.items() if default_kind(e) == "t"]

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
    bigglm.exceptions.ConfigError: model.noise: 'ar 1' is not a noise model; use 'ols', 'arN' ...
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
