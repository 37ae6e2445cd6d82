"""bigglm: the fMRI general linear model, out of core, on Zarr, xarray and Dask.

The public surface, grouped: functions, classes, exceptions.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from bigglm import design
from bigglm.exceptions import BigGLMWarning, ConfigError, DesignError, StoreError
from bigglm.glm import GLMResult, fit
from bigglm.io import convert, convert_many, open_run, to_nifti

try:
    __version__ = version("bigglm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [  # noqa: RUF022 - grouped by kind (STYLE.md), sorted within each group
    # functions
    "convert",
    "convert_many",
    "design",
    "fit",
    "open_run",
    "to_nifti",
    # classes
    "GLMResult",
    # exceptions
    "BigGLMWarning",
    "ConfigError",
    "DesignError",
    "StoreError",
    "__version__",
]
