"""Literal types for bigglm's keyword options, gathered in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

__all__ = [
    "ClusterKind",
    "Connectivity",
    "ContrastKind",
    "DesignConvention",
    "DriftModel",
    "GlobalScaling",
    "GroupModel",
    "HRFName",
    "HeightControl",
    "MissingRule",
    "NoiseModel",
    "PermutationScheme",
    "Precision",
    "ProgressCallback",
    "ResidualFormat",
]

#: SPM's global scaling of the data: none, each session's mean global to 100 (SPM's
#: default grand mean scaling), or each scan's global to 100 (SPM's 'Scaling').
GlobalScaling = Literal["none", "session", "scan"]
#: Noise models for :func:`bigglm.fit`: ordinary least squares, AR(p) prewhitening, or
#: SPM's pooled AR(0.2). Any ``"arN"`` with N >= 1 is accepted at run time.
NoiseModel = Literal["ols", "ar1", "ar2", "ar3", "ar4", "ar5", "ar6", "spm-ar1", "film"]

#: Named haemodynamic response models (as in nilearn).
HRFName = Literal[
    "spm",
    "spm + derivative",
    "spm + derivative + dispersion",
    "glover",
    "glover + derivative",
    "glover + derivative + dispersion",
    "fir",
]

#: Whose rules build a first-level design: nilearn's, an SPM release's
#: (:mod:`bigglm.design.spm`) or FSL FEAT's (:mod:`bigglm.design.fsl`).
DesignConvention = Literal["nilearn", "spm12", "spm8", "spm5", "fsl"]

#: Low-frequency drift models (as in nilearn).
DriftModel = Literal["cosine", "polynomial"]

#: Group-level models of :func:`bigglm.group.fit`: ordinary least squares per voxel with
#: the subjects present there, or mixed effects with the first-level variances (REML).
GroupModel = Literal["ols", "mixed"]

#: What marks a voxel a subject's map does not cover (:func:`bigglm.group.collect`):
#: NaN only, or NaN and an exact 0 (FSL, nilearn and AFNI write 0 outside their masks).
MissingRule = Literal["nan", "nan-or-zero"]

#: What :func:`bigglm.inference.permutation_test` rearranges: sign flips (errors
#: symmetric), permutations (errors exchangeable), both, or the usual choice for the
#: design ("auto": sign flips for a one-column design, permutations otherwise).
PermutationScheme = Literal["auto", "signflip", "permute", "both"]

#: Float type of the permutation products (statistics are assembled in float64).
Precision = Literal["single", "double"]

#: Statistic computed by :meth:`bigglm.GLMResult.contrast`.
ContrastKind = Literal["t", "F"]

#: File formats of :meth:`bigglm.GLMResult.write_residuals`: one 4D NIfTI or one Zarr
#: store (the layout of a converted run) per run.
ResidualFormat = Literal["nifti", "zarr"]

#: Voxel-level error control of :func:`bigglm.inference.thresholds.threshold` (as
#: nilearn's ``threshold_stats_img``): an uncorrected false positive rate, the false
#: discovery rate (Benjamini–Hochberg) or the family-wise error rate (Bonferroni).
HeightControl = Literal["fpr", "fdr", "bonferroni"]

#: Voxel neighbourhoods of :func:`bigglm.inference.spatial.voxel_graph`: faces (6), faces
#: and edges (18), or faces, edges and corners (26), as scipy's
#: ``generate_binary_structure(3, 1 | 2 | 3)``.
Connectivity = Literal[6, 18, 26]

#: Cluster profiles understood by :mod:`bigglm.cluster`.
ClusterKind = Literal["local", "address", "slurm", "pbs", "sge"]

#: Progress callback accepted by long-running library functions: called with
#: ``(done, total)`` after each unit of work. The CLI turns it into a progress bar;
#: library code itself only logs.
ProgressCallback = Callable[[int, int], None]
