"""Design matrices: events convolved with an HRF, confounds, drifts, and diagnostics.

The design is computed once per run (a small ``time x regressor`` DataFrame) and shared
by every voxel. Given the same arguments, :func:`make_design` gives the same columns as
nilearn's ``make_first_level_design_matrix``. The names load their modules (and pandas)
on first use (:mod:`bigglm._lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    from bigglm.design.hemodynamic import convolution_matrix, from_time_function, hrf
    from bigglm.design.matrix import frame_times, make_design, make_run_design
    from bigglm.design.orthogonal import orthogonalize
else:
    from bigglm import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        __name__,
        {
            "bigglm.design.confounds": ["load_confounds", "scrubbing_regressors"],
            "bigglm.design.diagnostics": [
                "check_estimable",
                "condition_number",
                "contrast_scale",
                "correlation_matrix",
                "dependent_columns",
                "matrix_rank",
                "variance_inflation_factors",
            ],
            "bigglm.design.events": ["read_events"],
            "bigglm.design.hemodynamic": ["convolution_matrix", "from_time_function", "hrf"],
            "bigglm.design.matrix": ["frame_times", "make_design", "make_run_design"],
            "bigglm.design.orthogonal": ["orthogonalize"],
        },
    )

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
