"""Ingest: NIfTI series to chunked Zarr stores, opened lazily as ``bold(time, voxel)``.

- :func:`convert` / :func:`convert_many`: NIfTI to store (:mod:`bigglm.io.convert`);
- :func:`open_run`: a store as a lazy :class:`xarray.Dataset` (:mod:`bigglm.io.store`);
- :func:`to_nifti`: per-voxel values back to NIfTI on the run's grid (:mod:`bigglm.io.export`);
- :func:`compute_epi_mask`: the EPI brain mask used when none is given (:mod:`bigglm.io.mask`).
"""

from __future__ import annotations

from bigglm.io.convert import convert, convert_many
from bigglm.io.export import to_nifti
from bigglm.io.mask import compute_epi_mask
from bigglm.io.store import open_run

__all__ = ["compute_epi_mask", "convert", "convert_many", "open_run", "to_nifti"]
