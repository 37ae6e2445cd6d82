"""The one-pass blockwise GLM engine: :func:`fit` and :class:`GLMResult`.

Modules: :mod:`~bigglm.glm.stats` (per-chunk sufficient statistics),
:mod:`~bigglm.glm.ar` (Yule–Walker and exact AR(p) whitening), :mod:`~bigglm.glm.finish`
(per voxel block), :mod:`~bigglm.glm.engine` (the Dask graph),
:mod:`~bigglm.glm.result` (the result and its outputs), :mod:`~bigglm.glm.linalg`
(matrix products that keep BLAS off extra threads). :func:`fit` and :class:`GLMResult`
load them (and Dask, xarray) on first use.
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
