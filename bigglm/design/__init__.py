"""Design matrices: events convolved with an HRF, confounds, drifts, and diagnostics.

The design is computed once per run (a small ``time x regressor`` DataFrame) and shared
by every voxel. Given the same arguments, :func:`make_design` gives the same columns as
nilearn's ``make_first_level_design_matrix``.
"""

from __future__ import annotations

from bigglm.design.confounds import load_confounds, scrubbing_regressors
from bigglm.design.diagnostics import (
    check_estimable,
    condition_number,
    contrast_scale,
    correlation_matrix,
    dependent_columns,
    matrix_rank,
    variance_inflation_factors,
)
from bigglm.design.events import read_events
from bigglm.design.hrf import convolution_matrix, from_time_function, hrf
from bigglm.design.matrix import frame_times, make_design, make_run_design
from bigglm.design.orthogonal import orthogonalize

__all__ = [
    "check_estimable",
    "condition_number",
    "contrast_scale",
    "convolution_matrix",
    "correlation_matrix",
    "dependent_columns",
    "frame_times",
    "from_time_function",
    "hrf",
    "load_confounds",
    "make_design",
    "make_run_design",
    "matrix_rank",
    "orthogonalize",
    "read_events",
    "scrubbing_regressors",
    "variance_inflation_factors",
]
