"""bigglm: the fMRI general linear model, out of core, on Zarr, xarray and Dask.

The public surface, grouped: functions, classes, exceptions. Names load lazily: ``import
bigglm`` is quick, and Dask, xarray, pandas and Zarr load when a name that needs them is
first used (see :mod:`bigglm._lazy`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from bigglm.exceptions import BigGLMWarning, ConfigError, DesignError, StoreError

if TYPE_CHECKING:  # the names' homes; at run time each loads on first use
    from bigglm import design, group, inference
    from bigglm.glm.engine import fit
    from bigglm.glm.result import GLMResult
    from bigglm.io.conversion import convert, convert_many
    from bigglm.io.export import to_cifti, to_gifti, to_nifti
    from bigglm.io.store import open_run
else:
    from bigglm import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        __name__,
        {
            "bigglm": ["design", "group", "inference"],
            "bigglm.glm.engine": ["fit"],
            "bigglm.glm.result": ["GLMResult"],
            "bigglm.io.conversion": ["convert", "convert_many"],
            "bigglm.io.export": ["to_cifti", "to_gifti", "to_nifti"],
            "bigglm.io.store": ["open_run"],
        },
    )

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
    "group",
    "inference",
    "open_run",
    "to_cifti",
    "to_gifti",
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
