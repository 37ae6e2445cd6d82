"""The one-pass blockwise GLM engine: :func:`fit` and :class:`GLMResult`.

Modules: :mod:`~bigglm.glm.stats` (per-chunk sufficient statistics),
:mod:`~bigglm.glm.ar` (Yule–Walker estimation and exact AR(p) whitening),
:mod:`~bigglm.glm.ar1` (the AR(1) fast path), :mod:`~bigglm.glm.finish` (per voxel
block), :mod:`~bigglm.glm.engine` (the Dask graph), :mod:`~bigglm.glm.result` (the result:
its views and contrasts), :mod:`~bigglm.glm.orchestration` (computing the graph),
:mod:`~bigglm.glm.persistence` (result stores, maps and residual files),
:mod:`~bigglm.glm.linalg` (batched products and solves across voxels). :func:`fit` and
:class:`GLMResult` load them (and Dask, xarray) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bigglm.glm.engine import fit
    from bigglm.glm.result import GLMResult
else:
    from bigglm import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        __name__, {"bigglm.glm.engine": ["fit"], "bigglm.glm.result": ["GLMResult"]}
    )

__all__ = ["GLMResult", "fit"]
