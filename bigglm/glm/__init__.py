"""The one-pass blockwise GLM engine: :func:`fit` and :class:`GLMResult`.

Modules: :mod:`~bigglm.glm.stats` (per-chunk sufficient statistics),
:mod:`~bigglm.glm.ar` (Yule–Walker and exact AR(p) whitening), :mod:`~bigglm.glm.finish`
(per voxel block), :mod:`~bigglm.glm.engine` (the Dask graph),
:mod:`~bigglm.glm.result` (the result and its outputs), :mod:`~bigglm.glm.linalg`
(matrix products that keep BLAS off extra threads).
"""

from __future__ import annotations

from bigglm.glm.engine import fit
from bigglm.glm.result import GLMResult

__all__ = ["GLMResult", "fit"]
