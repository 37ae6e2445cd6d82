"""Inference on group maps: permutation tests, TFCE, clusters, thresholds and tables.

:func:`permutation_test` rearranges subjects (sign flips, Freedman–Lane permutations,
exchangeability blocks; every rearrangement when they are few) as blocked matrix
products over the group store, read once, and gives uncorrected and family-wise error
p values: voxel-wise max-T, TFCE and cluster extent and mass. :func:`write_maps` writes
them as ``-log10 p`` NIfTI maps with BIDS names. :func:`threshold` gives parametric
thresholds (uncorrected, FDR, Bonferroni; nilearn's ``threshold_stats_img``), and
:func:`clusters_table` the clusters and peaks of a map (nilearn's ``get_clusters_table``,
plus FWE and FDR p columns), written as TSV by :func:`write_table`. On cortical
surfaces, :func:`mesh_adjacency` gives the graph of a store's vertices for
``permutation_test(..., adjacency=...)``, and :func:`surface_clusters_table` the clusters
with their hemisphere and vertex count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names' homes; at run time each loads on first use
    from bigglm.inference.meshes import mesh_adjacency, surface_clusters_table
    from bigglm.inference.outputs import permutation_table, write_maps
    from bigglm.inference.permutation import permutation_test
    from bigglm.inference.resampling import Rearrangements, rearrangements
    from bigglm.inference.spatial import (
        Graph,
        join_graphs,
        mesh_graph,
        sparse_graph,
        tfce,
        vertex_areas,
        voxel_graph,
    )
    from bigglm.inference.tables import clusters_table, fdr_q_values, write_table
    from bigglm.inference.thresholds import threshold
else:
    from bigglm import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        __name__,
        {
            "bigglm.inference.meshes": ["mesh_adjacency", "surface_clusters_table"],
            "bigglm.inference.outputs": ["permutation_table", "write_maps"],
            "bigglm.inference.permutation": ["permutation_test"],
            "bigglm.inference.resampling": ["Rearrangements", "rearrangements"],
            "bigglm.inference.spatial": [
                "Graph",
                "join_graphs",
                "mesh_graph",
                "sparse_graph",
                "tfce",
                "vertex_areas",
                "voxel_graph",
            ],
            "bigglm.inference.tables": ["clusters_table", "fdr_q_values", "write_table"],
            "bigglm.inference.thresholds": ["threshold"],
        },
    )

__all__ = [  # noqa: RUF022 - grouped by kind (STYLE.md), sorted within each group
    # functions
    "clusters_table",
    "fdr_q_values",
    "join_graphs",
    "mesh_adjacency",
    "mesh_graph",
    "permutation_table",
    "permutation_test",
    "rearrangements",
    "sparse_graph",
    "surface_clusters_table",
    "tfce",
    "threshold",
    "vertex_areas",
    "voxel_graph",
    "write_maps",
    "write_table",
    # classes
    "Graph",
    "Rearrangements",
]
