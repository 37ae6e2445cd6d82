"""``run_analysis``: every unit of a configuration, step after step, resumably."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bigglm.config import AnalysisConfig
from bigglm.pipeline.lock import analysis_identity, claim_outputs, lock_units
from bigglm.pipeline.plan import STATE, RunPlan, UnitPlan, plan
from bigglm.pipeline.steps import (
    Checksums,
    Conversion,
    ProgressFactory,
    StepRecords,
    UnitOutcome,
    convert_on_client,
    convert_step,
    design_step,
    epi_mask,
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


def run_analysis(
    config: AnalysisConfig,
    *,
    subjects: Sequence[str] | None = None,
    client: Any = None,
    progress: ProgressFactory | None = None,
    overwrite: bool = False,
) -> list[UnitOutcome]:
    """Run a first-level analysis end to end, resuming whatever an earlier run finished.

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

    Returns
    -------
    list of UnitOutcome
        Per unit: steps run or reused, timings, the maps and provenance written.

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
    outputs = config.outputs.folder
    outputs.mkdir(parents=True, exist_ok=True)
    factory: ProgressFactory = progress or (lambda description: nullcontext(_no_progress))
    records = {u.name: StepRecords(outputs, u.name) for u in units}
    sums = Checksums(outputs / STATE / "checksums")
    claim_outputs(
        outputs, analysis_identity(config), [u.folder for u in units], overwrite=overwrite
    )
    with lock_units(outputs, [u.name for u in units]), _client(config, client) as active:
        masks = {u.name: _prepare(u, config) for u in units}
        _convert_up_front(units, masks, config, records, sums, active, factory)
        return [
            _run_unit(u, masks[u.name], config, records[u.name], sums, active, factory)
            for u in units
        ]


def _prepare(unit: UnitPlan, config: AnalysisConfig) -> Path | None:
    """Make the unit's folder, delete what a killed run left (we hold the unit's lock),
    and return its mask as known before any conversion: configured, or the intersection
    of its runs' brain masks; None when the first run's EPI mask will be used."""
    unit.folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(unit)
    if unit.mask is None and any(rp.run.mask is not None for rp in unit.runs):
        return intersection_mask(unit, config)
    return unit.mask


def _convert_up_front(
    units: list[UnitPlan],
    masks: dict[str, Path | None],
    config: AnalysisConfig,
    records: dict[str, StepRecords],
    sums: Checksums,
    client: Any,
    progress: ProgressFactory,
) -> None:
    """Convert the runs of every unit in parallel on the client's workers.

    Two waves: the runs whose mask is known (the configured mask, the intersection of
    the runs' brain masks, or a unit's first run, which computes its EPI mask), then the
    other runs of units whose later runs take the first run's mask. Files are hashed
    on the workers too. With fewer than two conversions to do, the unit steps convert
    in this process as before (one conversion alone is as fast there, with finer
    progress).
    """
    sums.prefetch([rp.run.bold for u in units for rp in u.runs], client)
    first: list[Conversion] = []
    later: list[UnitPlan] = []
    for unit in units:
        mask = masks[unit.name]
        runs = unit.runs if mask is not None or len(unit.runs) == 1 else unit.runs[:1]
        first += _pending(unit, runs, mask, records, sums, config)
        if len(runs) < len(unit.runs):
            later.append(unit)
    if len(first) > 1 or (first and later):  # later runs wait for their unit's first
        convert_on_client(first, config, client, progress)
    second: list[Conversion] = []
    for unit in later:
        if not unit.runs[0].store.exists():
            continue  # its first run was the only conversion: the unit converts in order
        second += _pending(unit, unit.runs[1:], epi_mask(unit, config), records, sums, config)
    if len(second) > 1:
        convert_on_client(second, config, client, progress)


def _pending(
    unit: UnitPlan,
    runs: Sequence[RunPlan],
    mask: Path | None,
    records: dict[str, StepRecords],
    sums: Checksums,
    config: AnalysisConfig,
) -> list[Conversion]:
    """The runs among ``runs`` whose stores must be made."""
    jobs = []
    for rp in runs:
        key = pending_conversion(rp, mask, records[unit.name], sums, config)
        if key is not None:
            jobs.append(Conversion(rp, mask, records[unit.name], key, sums(rp.run.bold)))
    return jobs


def _no_progress(done: int, total: int) -> None:
    """A progress callback that does nothing."""


@contextmanager
def _client(config: AnalysisConfig, client: Any) -> Iterator[Any]:
    if client is not None:
        yield client
        return
    from bigglm.cluster import client_from_profile

    with client_from_profile(config.cluster) as started:
        yield started


def _run_unit(
    unit: UnitPlan,
    mask: Path | None,
    config: AnalysisConfig,
    steps: StepRecords,
    sums: Checksums,
    client: Any,
    progress: ProgressFactory,
) -> UnitOutcome:
    from bigglm.io import open_run

    started = datetime.now(UTC).isoformat()
    outcome = UnitOutcome(unit.name, len(unit.runs), sum(rp.n_scans for rp in unit.runs))
    for index, rp in enumerate(unit.runs):
        convert_step(unit, rp, mask, steps, sums, config, progress)
        if mask is None and index == 0 and len(unit.runs) > 1:
            mask = epi_mask(unit, config)
    design_step(unit, steps)
    result, fit_key = fit_step(unit, config, steps, client, progress)
    outcome.n_voxels = int(open_run(unit.runs[0].store).sizes["voxel"])
    maps_step(unit, config, result, fit_key, steps, outcome)
    residuals_step(unit, config, result, fit_key, steps, outcome, client)
    outcome.steps = dict(steps.timings)
    outcome.provenance = provenance_step(unit, config, outcome, sums, started)
    if config.outputs.report:
        outcome.report = report_step(unit, config, outcome)
    return outcome
