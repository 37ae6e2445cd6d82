"""``run_analysis``: every unit of a configuration, step after step, resumably."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from bigglm.config import AnalysisConfig
from bigglm.exceptions import ConfigError
from bigglm.pipeline.group import UNIT as GROUP
from bigglm.pipeline.group import GroupOutcome, plan_group, run_group
from bigglm.pipeline.lock import analysis_identity, claim_outputs, lock_units
from bigglm.pipeline.plan import STATE, RunPlan, UnitPlan, plan
from bigglm.pipeline.records import Checksums, StepRecords
from bigglm.pipeline.steps import (
    Conversion,
    ProgressFactory,
    RunMask,
    StepContext,
    UnitOutcome,
    convert_on_client,
    convert_step,
    design_step,
    first_run_mask,
    fit_step,
    intersection_mask,
    maps_step,
    pending_conversion,
    provenance_step,
    remove_leftovers,
    report_step,
    residuals_step,
)

__all__ = ["run_analysis"]

logger = logging.getLogger(__name__)

Level = Literal["all", "first", "group"]


def run_analysis(
    config: AnalysisConfig,
    *,
    subjects: Sequence[str] | None = None,
    client: Any = None,
    progress: ProgressFactory | None = None,
    overwrite: bool = False,
    level: Level = "all",
) -> list[UnitOutcome | GroupOutcome]:
    """Run an analysis end to end, resuming whatever an earlier run finished.

    The first level for every unit, then, with a ``group`` section, the group level
    (:mod:`bigglm.pipeline.group`) on the maps of all subjects.

    Parameters
    ----------
    config : AnalysisConfig
        A validated configuration.
    subjects : sequence of str, optional
        Only these subjects (the other units are left as they are).
    client : distributed.Client, optional
        The Dask client for the fit; default: one from ``config.cluster``.
    progress : callable, optional
        ``progress(description)`` returns a context manager yielding a ``(done, total)``
        callback (the CLI draws a bar with it).
    overwrite : bool
        Take over an outputs folder that holds another analysis's outputs (see
        :func:`bigglm.pipeline.lock.claim_outputs`). A rerun of the same analysis (the
        same YAML file; for a configuration built in Python, the same ``inputs``) resumes
        without it. Files bigglm did not write are never replaced.
    level : {"all", "first", "group"}
        Which part to run: both (default), the first level only, or the group level
        only (from first-level maps an earlier run wrote). With ``subjects`` the group
        level is not run: it needs every subject.

    Returns
    -------
    list of UnitOutcome and GroupOutcome
        Per unit: steps run or reused, timings, the maps and provenance written; last,
        the group level's outcome when it ran.

    Raises
    ------
    ConfigError, DesignError
        From :func:`plan`, before any long work starts.
    StoreError
        If another run holds the outputs' lock, the outputs folder belongs to another
        analysis (and ``overwrite`` is False), or a store cannot be written.

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "/nope.nii.gz"}]},
    ...                     "outputs": {"folder": "/tmp/o"}})
    >>> run_analysis(cfg)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.ConfigError: inputs: /nope.nii.gz does not exist; check the path
    """
    units = plan(config, subjects)
    with_group = config.group is not None and level != "first" and subjects is None
    if config.group is not None and level != "first" and subjects is not None:
        logger.info("group level not run: it needs every subject, and --subject selects some")
    if level == "group" and config.group is None:
        raise ConfigError("level 'group': this configuration has no group section")
    if with_group and any(u.geometry != "voxel" for u in units):
        raise ConfigError(
            "group: the workflow's group level reads volume maps, and these runs are on "
            "surfaces; run the first level only (level 'first'), then fit the group on the "
            "surface maps with the Python API"
        )
    group_plan = plan_group(config, units) if with_group else None
    first = units if level != "group" else []
    outputs = config.outputs.folder
    outputs.mkdir(parents=True, exist_ok=True)
    claim_outputs(
        outputs, analysis_identity(config), [u.folder for u in units], overwrite=overwrite
    )
    names = [u.name for u in first] + ([GROUP] if group_plan is not None else [])
    with lock_units(outputs, names), _client(config, client) as active:
        ctx = StepContext(
            config=config,
            client=active,
            progress=progress or (lambda description: nullcontext(_no_progress)),
            checksums=Checksums(outputs / STATE / "checksums"),
            records={name: StepRecords(outputs, name) for name in names},
        )
        masks = {u.name: _prepare(ctx, u) for u in first}
        _convert_up_front(ctx, first, masks)
        done: list[UnitOutcome | GroupOutcome] = [_run_unit(ctx, u, masks[u.name]) for u in first]
        if group_plan is not None:
            done.append(run_group(ctx, group_plan))
        return done


def _prepare(ctx: StepContext, unit: UnitPlan) -> Path | None:
    """Make the unit's folder, delete what a killed run left (we hold the unit's lock),
    and return its mask as known before any conversion: configured, or the intersection
    of its runs' brain masks; None when the first run's EPI mask will be used."""
    unit.folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(unit)
    if unit.mask is None and any(rp.run.mask is not None for rp in unit.runs):
        return intersection_mask(ctx, unit)
    return unit.mask


def _convert_up_front(
    ctx: StepContext, units: list[UnitPlan], masks: dict[str, Path | None]
) -> None:
    """Convert the runs of every unit in parallel on the client's workers.

    Two waves: the runs whose mask is known (the configured mask, the intersection of
    the runs' brain masks, or a unit's first run, which computes its EPI mask; every
    CIFTI-2 run), then the other runs of units whose later runs take the first run's
    mask (volumes: its EPI mask; GIFTI: its vertices). Files are hashed
    on the workers too. With fewer than two conversions to do, the unit steps convert
    in this process as before (one conversion alone is as fast there, with finer
    progress).
    """
    files = [path for u in units for rp in u.runs for path in rp.run.files]
    ctx.checksums.prefetch(files, ctx.client)
    first: list[Conversion] = []
    later: list[UnitPlan] = []
    for unit in units:
        mask = masks[unit.name]
        # CIFTI-2 runs keep their own grayordinates: none waits for the first run's mask
        known = mask is not None or len(unit.runs) == 1 or unit.geometry == "grayordinate"
        runs = unit.runs if known else unit.runs[:1]
        first += _pending(ctx, unit, runs, mask)
        if len(runs) < len(unit.runs):
            later.append(unit)
    if len(first) > 1 or (first and later):  # later runs wait for their unit's first
        convert_on_client(ctx, first)
    second: list[Conversion] = []
    for unit in later:
        if not unit.runs[0].store.exists():
            continue  # its first run was the only conversion: the unit converts in order
        second += _pending(ctx, unit, unit.runs[1:], first_run_mask(ctx, unit))
    if len(second) > 1:
        convert_on_client(ctx, second)


def _pending(
    ctx: StepContext, unit: UnitPlan, runs: Sequence[RunPlan], mask: RunMask | None
) -> list[Conversion]:
    """The runs among ``runs`` whose stores must be made."""
    jobs = []
    for rp in runs:
        key = pending_conversion(ctx, unit, rp, mask)
        if key is not None:
            digests = [ctx.checksums(path) for path in rp.run.files]
            jobs.append(Conversion(rp, mask, unit.name, key, digests))
    return jobs


def _no_progress(done: int, total: int) -> None:
    """A progress callback that does nothing."""


@contextmanager
def _client(config: AnalysisConfig, client: Any) -> Iterator[Any]:
    if client is not None:
        yield client
        return
    from bigglm.cluster import client_from_profile
    from bigglm.pipeline.plan import state_folder

    credentials = state_folder(config.outputs.folder) / "credentials"
    with client_from_profile(config.cluster, credentials=credentials) as started:
        yield started


def _run_unit(ctx: StepContext, unit: UnitPlan, mask: RunMask | None) -> UnitOutcome:
    from bigglm.io import open_run

    started = datetime.now(UTC).isoformat()
    outcome = UnitOutcome(unit.name, len(unit.runs), sum(rp.n_scans for rp in unit.runs))
    for index, rp in enumerate(unit.runs):
        convert_step(ctx, unit, rp, mask)
        if mask is None and index == 0 and len(unit.runs) > 1 and unit.geometry != "grayordinate":
            mask = first_run_mask(ctx, unit)
    design_step(ctx, unit)
    result, fit_key = fit_step(ctx, unit)
    outcome.n_voxels = int(open_run(unit.runs[0].store).sizes["voxel"])
    maps_step(ctx, unit, result, fit_key, outcome)
    residuals_step(ctx, unit, result, fit_key, outcome)
    outcome.steps = dict(ctx.steps(unit).timings)
    outcome.provenance = provenance_step(ctx, unit, outcome, started)
    if ctx.config.outputs.report:
        outcome.report = report_step(ctx, unit, outcome)
    return outcome
