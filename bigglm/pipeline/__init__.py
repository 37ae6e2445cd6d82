"""The first-level workflow behind ``bigglm run``: validate, convert, design, fit, contrast, map.

:func:`plan` checks a configuration and its inputs in seconds (files exist, TRs and
lengths agree, designs build, contrasts name real columns) before any long work;
:func:`run_analysis` then works through each *unit* (the runs of one subject and task,
fitted together):

1. convert each run to a Zarr store, skipped when a complete store made from files with
   the same SHA-256 already exists;
2. build the designs and write them as TSV;
3. fit the GLM on Dask and save the result (Zarr);
4. compute each contrast and write its maps (NIfTI, BIDS-derivatives names);
5. if ``outputs.residuals`` asks for them, write each run's residuals (a second pass
   over the data; ``<run>_desc-residuals_bold.nii.gz`` or ``.zarr``);
6. write a provenance JSON (configuration, versions, input checksums, timings).

Every output is written to a temporary name in its folder and renamed into place, and
each finished step is recorded in ``<outputs>/.bigglm/steps/<unit>/<step>.json`` with a
digest of the inputs it used. A run that is killed at any point (even SIGKILL) and started
again skips the recorded steps whose inputs are unchanged and produces identical
outputs. A lock per unit (``<outputs>/.bigglm/locks/<unit>.lock``) makes a second run on
the same outputs refuse to start instead of racing the first; locks left by dead
processes on this host are taken over.
"""

from __future__ import annotations

from bigglm.pipeline.direct import fit_stores, parse_contrast_options
from bigglm.pipeline.lock import lock_units
from bigglm.pipeline.plan import (
    STATE,
    RunPlan,
    UnitPlan,
    discover,
    map_path,
    plan,
    state_folder,
    unit_folder,
)
from bigglm.pipeline.run import run_analysis
from bigglm.pipeline.steps import UnitOutcome

__all__ = [
    "STATE",
    "RunPlan",
    "UnitOutcome",
    "UnitPlan",
    "discover",
    "fit_stores",
    "lock_units",
    "map_path",
    "parse_contrast_options",
    "plan",
    "run_analysis",
    "state_folder",
    "unit_folder",
]
