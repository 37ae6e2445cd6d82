"""Literal types for bigglm's keyword options, gathered in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

__all__ = [
    "ClusterKind",
    "ContrastKind",
    "DriftModel",
    "HRFName",
    "NoiseModel",
    "ProgressCallback",
    "ResidualFormat",
]

#: Noise models for :func:`bigglm.fit`: ordinary least squares or AR(p) prewhitening.
#: Any ``"arN"`` with N >= 1 is accepted at run time; these are the documented ones.
NoiseModel = Literal["ols", "ar1", "ar2", "ar3", "ar4", "ar5", "ar6"]

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

#: Low-frequency drift models (as in nilearn).
DriftModel = Literal["cosine", "polynomial"]

#: Statistic computed by :meth:`bigglm.GLMResult.contrast`.
ContrastKind = Literal["t", "F"]

#: File formats of :meth:`bigglm.GLMResult.write_residuals`: one 4D NIfTI or one Zarr
#: store (the layout of a converted run) per run.
ResidualFormat = Literal["nifti", "zarr"]

#: Cluster profiles understood by :mod:`bigglm.cluster`.
ClusterKind = Literal["local", "address", "slurm", "pbs", "sge"]

#: Progress callback accepted by long-running library functions: called with
#: ``(done, total)`` after each unit of work. The CLI turns it into a progress bar;
#: library code itself only logs.
ProgressCallback = Callable[[int, int], None]
