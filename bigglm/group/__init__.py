"""The group level: second-level models on stacks of first-level maps, out of core.

Per-subject maps (bigglm results, or effect and variance maps from nilearn, FSL or SPM)
are collected once into a group store, ``effect(subject, voxel)`` and
``variance(subject, voxel)``, chunked in both dimensions (:func:`collect`,
:func:`open_group`). A group design comes from a participants table, by columns or by a
Wilkinson formula (:func:`design`). :func:`fit` fits every voxel with the subjects
present there, by ordinary least squares or mixed effects with the first-level variances,
and returns a :class:`GroupResult` whose contrasts give t, F, p and z maps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names' homes; at run time each loads on first use
    from bigglm.group.collection import collect, open_group
    from bigglm.group.designs import design
    from bigglm.group.engine import fit
    from bigglm.group.result import GroupResult
else:
    from bigglm import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        __name__,
        {
            "bigglm.group.collection": ["collect", "open_group"],
            "bigglm.group.designs": ["design"],
            "bigglm.group.engine": ["fit"],
            "bigglm.group.result": ["GroupResult"],
        },
    )

__all__ = [  # noqa: RUF022 - grouped by kind (STYLE.md), sorted within each group
    # functions
    "collect",
    "design",
    "fit",
    "open_group",
    # classes
    "GroupResult",
]
