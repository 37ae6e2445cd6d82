"""Ingest: NIfTI, GIFTI and CIFTI-2 series to chunked Zarr stores, opened as ``bold(time, voxel)``.

- :func:`convert` / :func:`convert_many`: NIfTI to store (:mod:`bigglm.io.conversion`),
  GIFTI and CIFTI-2 too (:mod:`bigglm.io.surface_conversion`);
- :func:`open_run`: a store as a lazy :class:`xarray.Dataset` (:mod:`bigglm.io.store`);
- :func:`verify_store`: check that a store is whole (every chunk there, checksums).
- :func:`to_nifti`: per-voxel values back to NIfTI on the run's grid (:mod:`bigglm.io.export`);
  :func:`to_gifti` and :func:`to_cifti` for surface stores;
- :func:`compute_epi_mask`: the EPI brain mask used when none is given (:mod:`bigglm.io.mask`).

The names load their modules (and Zarr, Dask, xarray) on first use (:mod:`bigglm._lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bigglm.io.conversion import convert, convert_many
    from bigglm.io.export import to_cifti, to_gifti, to_nifti
    from bigglm.io.mask import compute_epi_mask
    from bigglm.io.store import open_run, verify_store
else:
    from bigglm import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        __name__,
        {
            "bigglm.io.conversion": ["convert", "convert_many"],
            "bigglm.io.export": ["to_cifti", "to_gifti", "to_nifti"],
            "bigglm.io.mask": ["compute_epi_mask"],
            "bigglm.io.store": ["open_run", "verify_store"],
        },
    )

__all__ = [
    "compute_epi_mask",
    "convert",
    "convert_many",
    "open_run",
    "to_cifti",
    "to_gifti",
    "to_nifti",
    "verify_store",
]
