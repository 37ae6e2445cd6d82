"""The group level of a workflow run: collect each first-level contrast's maps, fit the
group model, write each group contrast's maps, threshold them and tabulate the clusters.

For every first-level t contrast the ``group`` section takes up (``group.inputs``):

1. ``collect``: the subjects' effect and variance maps (the first level's outputs) into a
   group store, ``<store folder>/group/contrast-<label>.zarr``;
2. ``fit``: :func:`bigglm.group.fit` with the design built from the participants table;
3. per group contrast, into ``<outputs>/group/contrast-<label>/``: the maps of
   :meth:`bigglm.group.GroupResult.to_nifti` (``group_contrast-<g>_stat-*``), the z map
   thresholded as ``inference`` says (``group_desc-thresholded_contrast-<g>_stat-z``)
   with its cluster table (``..._clusters.tsv``), and, with ``inference.permutation``,
   the permutation maps (``-log10 p``: uncorrected, FWE max-T, TFCE, cluster) and their
   cluster table with FWE p values (``group_desc-permutation_contrast-<g>_clusters.tsv``).

The step is resumable as the first level's are: its key covers the SHA-256 of every input
map and every option that changes the outputs, so it reruns only when one of them changed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bigglm.config import AnalysisConfig
from bigglm.exceptions import ConfigError
from bigglm.pipeline.plan import UnitPlan, map_path

if TYPE_CHECKING:
    from bigglm.report.group import ContrastSection

__all__ = ["GroupOutcome", "GroupPlan", "plan_group", "run_group"]

logger = logging.getLogger(__name__)

#: The records of the group steps, beside the units' (``.bigglm/steps/group``).
UNIT = "group"


@dataclass
class GroupPlan:
    """The group level, checked: one first-level unit per subject, the design."""

    units: list[UnitPlan]
    subjects: list[str]
    design: pd.DataFrame
    participants: Path | None


@dataclass
class GroupOutcome:
    """What the group level wrote, per first-level contrast."""

    maps: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    subjects: int = 0


def participants_path(config: AnalysisConfig) -> Path | None:
    """``group.participants``, else the BIDS dataset's ``participants.tsv`` if present."""
    assert config.group is not None
    if config.group.participants is not None:
        return config.group.participants
    bids = config.inputs.bids
    for folder in [bids.raw, bids.derivatives] if bids is not None else []:
        if folder is not None and (folder / "participants.tsv").is_file():
            return folder / "participants.tsv"
    return None


def _intercept_only(design: str | list[str]) -> bool:
    if isinstance(design, str):
        return design.replace(" ", "") in ("1", "intercept")
    return list(design) == ["intercept"]


def plan_group(config: AnalysisConfig, units: list[UnitPlan]) -> GroupPlan | None:
    """Check the ``group`` section against the first level's units, reading no map.

    Raises
    ------
    ConfigError
        If a subject has several first-level units, there are fewer than two subjects,
        or the design needs a participants table that is not there.
    DesignError
        If the participants table lacks a subject, a column or a value, or a group
        contrast names no design column or is not estimable.
    """
    group = config.group
    if group is None:
        return None  # before the imports: validate of a first-level analysis stays light
    from bigglm.glm import contrasts as con
    from bigglm.group import design as group_design

    by_subject: dict[str, list[UnitPlan]] = {}
    for unit in units:
        by_subject.setdefault(f"sub-{unit.subject}", []).append(unit)
    several = {s: [u.name for u in us] for s, us in by_subject.items() if len(us) > 1}
    if several:
        subject, names = next(iter(several.items()))
        raise ConfigError(
            f"group: {subject} has {len(names)} first-level units ({', '.join(names)}); the "
            "group level takes one map per subject, so select one task and session "
            "(inputs.bids.tasks, inputs.bids.sessions)"
        )
    subjects = sorted(by_subject)
    if len(subjects) < 2:
        raise ConfigError(f"group: {len(subjects)} subject(s); a group model needs at least 2")
    path = participants_path(config)
    if path is None and not _intercept_only(group.design):
        raise ConfigError(
            f"group.design {group.design!r} needs a participants table, and there is no "
            "participants.tsv in the BIDS folders; set group.participants"
        )
    table = _participants(path, subjects)
    matrix = group_design(table, group.design, subjects=subjects)
    columns = [str(c) for c in matrix.columns]
    for name, expression in group.contrasts.items():
        con.estimable_contrast(expression, matrix.to_numpy(np.float64), columns, name=name)
    units_in_order = [by_subject[s][0] for s in subjects]
    return GroupPlan(units_in_order, subjects, matrix, path)


def _participants(path: Path | None, subjects: list[str]) -> pd.DataFrame:
    """The participants table restricted to the analysed subjects (rows of subjects
    without first-level inputs are left out, and named in a log line)."""
    from bigglm.design.events import read_table

    if path is None:
        return pd.DataFrame({"participant_id": subjects})
    table, _ = read_table(path, "participants")
    if "participant_id" not in table.columns:
        return table  # group.design reports the missing column with its suggestions
    ids = table["participant_id"].astype(str)
    unused = sorted(set(ids) - set(subjects))
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        logger.info("group: %s has no first-level inputs for %s; left out", path.name, shown)
    return table[ids.isin(subjects).to_numpy()]


def run_group(ctx: Any, plan: GroupPlan) -> GroupOutcome:
    """Every first-level contrast the group section takes up, resumably.

    Parameters
    ----------
    ctx : bigglm.pipeline.steps.StepContext
        The run's context (configuration, client, step records, checksums).
    plan : GroupPlan
        From :func:`plan_group`.

    Returns
    -------
    GroupOutcome
    """
    config = ctx.config
    outcome = GroupOutcome(subjects=len(plan.subjects))
    for name in config.group_inputs:
        _one_contrast(ctx, plan, name, outcome)
    outcome.steps = dict(ctx.steps(UNIT).timings)
    return outcome


def _inputs(config: AnalysisConfig, plan: GroupPlan, name: str) -> tuple[list[Path], list[Path]]:
    effects = [map_path(config, u.name, name, "effect") for u in plan.units]
    variances = [map_path(config, u.name, name, "variance") for u in plan.units]
    for path in effects + variances:
        if not path.is_file():
            raise ConfigError(
                f"group: {path} is missing; run the first level for that subject first "
                "(bigglm run without --level group)"
            )
    return effects, variances


def _options(config: AnalysisConfig, plan: GroupPlan) -> dict[str, Any]:
    assert config.group is not None
    options = config.group.model_dump(mode="json", exclude={"participants", "inputs"})
    options["design_matrix"] = plan.design.round(12).to_dict(orient="split")
    return options


def _one_contrast(ctx: Any, plan: GroupPlan, name: str, outcome: GroupOutcome) -> None:
    from bigglm.glm.contrasts import label
    from bigglm.pipeline.records import step_key

    config = ctx.config
    assert config.group is not None
    effects, variances = _inputs(config, plan, name)
    first = label(name)
    folder = config.outputs.folder / "group" / f"contrast-{first}"
    store = config.store_folder / "group" / f"contrast-{first}.zarr"
    digests = [ctx.checksums(p) for p in effects + variances]
    key = step_key("group", name, plan.subjects, digests, json.dumps(_options(config, plan)))
    expected = _expected_outputs(config, folder)
    outcome.maps.extend(p for p in expected if p.name.endswith(".nii.gz"))
    outcome.tables.extend(p for p in expected if p.name.endswith(".tsv"))
    steps = ctx.steps(UNIT)
    if steps.done(f"contrast-{name}", key, [store, *expected]):
        return
    with steps.running(f"contrast-{name}", key):
        result = _fit(ctx, plan, effects, variances, store)
        folder.mkdir(parents=True, exist_ok=True)
        sections = [
            _write_contrast(ctx, plan, result, folder, group_name, expression)
            for group_name, expression in config.group.contrasts.items()
        ]
        if config.group.report:
            _report(ctx, plan, result, folder, f"contrast-{first}", sections)


def _fit(ctx: Any, plan: GroupPlan, effects: list[Path], variances: list[Path], store: Path) -> Any:
    import bigglm.group as group

    config = ctx.config
    store.parent.mkdir(parents=True, exist_ok=True)
    with ctx.progress(f"group collect {store.name}") as progress:
        group.collect(
            effects,
            store,
            variances=variances,
            subjects=plan.subjects,
            overwrite=True,
            client=ctx.client,
            progress=progress,
        )
    with ctx.progress(f"group fit {store.name}") as progress:
        return group.fit(
            store,
            plan.design,
            model=config.group.model,
            min_subjects=config.group.min_subjects,
            client=ctx.client,
            progress=progress,
        )


def _expected_outputs(config: AnalysisConfig, folder: Path) -> list[Path]:
    """The files one first-level contrast's group step writes (for the resume check)."""
    from bigglm.glm.contrasts import label, map_file_name

    assert config.group is not None
    paths = [folder / REPORT] if config.group.report else []
    for group_name in config.group.contrasts:
        g = label(group_name)
        paths += [folder / map_file_name("group", g, stat) for stat in _STATS]
        if config.group.inference.height_control is not None:
            paths.append(folder / map_file_name("group_desc-thresholded", g, "z"))
            paths.append(folder / _table_name("thresholded", g))
        permutation = config.group.inference.permutation
        if permutation is not None:
            stats = ["t", "logp", "logpmaxt"]
            stats += ["tfce", "logpmaxtfce"] if permutation.tfce else []
            stats += ["logpmaxsize", "logpmaxmass"] if permutation.cluster_threshold else []
            paths += [folder / map_file_name("group_desc-permutation", g, s) for s in stats]
            paths.append(folder / _table_name("permutation", g))
    return paths


#: The maps of each group contrast (GroupResult.to_nifti writes them all).
_STATS = ("effect", "variance", "t", "p", "z")


def _table_name(desc: str, group_label: str) -> str:
    return f"group_desc-{desc}_contrast-{group_label}_clusters.tsv"


def _write_contrast(
    ctx: Any, plan: GroupPlan, result: Any, folder: Path, name: str, expression: str
) -> ContrastSection:
    """The group contrast's maps, thresholds and tables; what its report shows."""
    from bigglm.glm.contrasts import contrast_rows, label, map_file_name
    from bigglm.report.group import ContrastSection

    config = ctx.config
    inference = config.group.inference
    g = label(name)
    files = result.to_nifti(folder, {name: expression}, prefix="group", overwrite=True)
    z_path = folder / map_file_name("group", g, "z")
    columns = [str(c) for c in plan.design.columns]
    weights = contrast_rows(expression, columns, name=name)[0]
    section = ContrastSection(name, dict(zip(columns, weights.tolist(), strict=True)), z_path)
    if inference.height_control is not None:
        _thresholded(ctx, result, folder, g, z_path, section)
    if inference.permutation is not None:
        _permutation(ctx, result, folder, g, expression, section)
    section.files = [*files, *section.files]
    return section


def _thresholded(
    ctx: Any, result: Any, folder: Path, g: str, z_path: Path, section: ContrastSection
) -> None:
    from bigglm.glm.contrasts import map_file_name
    from bigglm.inference import clusters_table, threshold
    from bigglm.inference.tables import write_table
    from bigglm.io import to_nifti

    inference = ctx.config.group.inference
    image, cut = threshold(
        z_path,
        alpha=inference.alpha,
        height_control=inference.height_control,
        cluster_threshold=inference.cluster_threshold,
        two_sided=inference.two_sided,
    )
    grid = result.grid()
    inside = np.asarray(grid["mask"].values, bool)
    values = np.asarray(image.dataobj, dtype=np.float64)[inside]
    path = folder / map_file_name("group_desc-thresholded", g, "z")
    to_nifti(values, grid, path, overwrite=True)
    sides = "two-sided" if inference.two_sided else "one-sided"
    rule = f"{inference.height_control} at alpha {inference.alpha:g} ({sides})"
    if inference.cluster_threshold:
        rule += f", clusters of at least {inference.cluster_threshold} voxels"
    logger.info("group %s: z threshold %.3f (%s)", g, cut, rule)
    table = clusters_table(
        z_path,
        cut if np.isfinite(cut) else np.inf,
        cluster_threshold=inference.cluster_threshold,
        two_sided=inference.two_sided,
    )
    write_table(table, folder / _table_name("thresholded", g), overwrite=True)
    section.threshold, section.rule = float(cut), f"Parametric: {rule}."
    section.tables[f"Clusters at |z| ≥ {cut:.3f}"] = table
    section.files = [*section.files, path]


def _permutation(
    ctx: Any, result: Any, folder: Path, g: str, expression: str, section: ContrastSection
) -> None:
    from scipy import stats

    from bigglm.glm.contrasts import map_file_name
    from bigglm.inference import permutation_table, permutation_test
    from bigglm.inference.outputs import write_maps
    from bigglm.inference.tables import write_table

    options = ctx.config.group.inference.permutation
    dof = float(np.nanmax(result.dataset["dof"].values))
    cut = None
    if options.cluster_threshold is not None:
        cut = float(stats.t.isf(options.cluster_threshold, dof))
    with ctx.progress(f"group permutations {g}") as progress:
        tested = permutation_test(
            result,
            contrast=expression,
            n_perm=options.n_perm,
            tfce=options.tfce,
            cluster_threshold=cut,
            two_sided=options.two_sided,
            seed=options.seed,
            client=ctx.client,
            progress=progress,
        )
    maps = write_maps(tested, folder, contrast=g, prefix="group_desc-permutation", overwrite=True)
    fwe = _max_t_cut(tested)
    table_cut = cut if cut is not None else fwe
    table = permutation_table(tested, stat_threshold=table_cut)
    write_table(table, folder / _table_name("permutation", g), overwrite=True)
    t = np.asarray(tested["t"].values)
    section.null_max = np.asarray(tested["max_t"].values)
    section.observed_max = float(np.nanmax(np.abs(t) if options.two_sided else t))
    what = "cluster-forming" if cut is not None else "the max-T FWE 0.05"
    section.tables[f"Permutation clusters at t ≥ {table_cut:.3f} ({what} threshold)"] = table
    section.files = [*section.files, *maps]
    exact = " (exact: every rearrangement)" if tested.attrs.get("exact") else ""
    section.rule += f" Permutation: {tested.sizes['rearrangement']} rearrangements{exact}."
    if section.threshold is None:  # no parametric rule: draw what survives FWE (max-T)
        section.z_map = folder / map_file_name("group_desc-permutation", g, "t")
        section.threshold, section.stat = fwe, "t"
        section.rule += f" Drawn: the t map where p(FWE) < 0.05 (max-T), t ≥ {fwe:.3f}."


def _max_t_cut(tested: Any) -> float:
    """Without a cluster-forming threshold: the table lists what survives FWE at 0.05,
    the 95th percentile of the max-T null distribution."""
    return float(np.quantile(np.asarray(tested["max_t"].values), 0.95))


def _report(
    ctx: Any, plan: GroupPlan, result: Any, folder: Path, title: str, sections: list[Any]
) -> Path:
    from bigglm.report.group import write_group_report

    group = ctx.config.group
    grid = result.grid()
    inside = np.asarray(grid["mask"].values, bool)
    n_map = np.full(inside.shape, np.nan)
    n_map[inside] = np.asarray(result.dataset["n"].values, dtype=np.float64)
    inference = group.inference
    permutation = inference.permutation
    facts = [
        ("subjects", str(len(plan.subjects))),
        ("participants", str(plan.participants or "none (intercept only)")),
        ("design", str(group.design)),
        ("model", group.model),
        ("min_subjects", str(group.min_subjects or "default")),
        ("parametric threshold", str(inference.height_control or "none")),
        (
            "permutation",
            "none"
            if permutation is None
            else f"{permutation.n_perm} rearrangements, "
            f"TFCE {'on' if permutation.tfce else 'off'}, seed {permutation.seed}",
        ),
    ]
    return write_group_report(
        folder / REPORT,
        title=title,
        design=plan.design,
        facts=facts,
        n_map=n_map,
        contrasts=sections,
    )


#: The group report's file name, in each first-level contrast's group folder.
REPORT = "group_report.html"
