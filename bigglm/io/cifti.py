"""CIFTI-2 dense series (``*.dtseries.nii``) in, and the brain models to write maps back.

A dense series is a NIfTI-2 file whose data are ``(time, grayordinate)``: the first axis
a CIFTI ``SeriesAxis`` (start, step, unit), the second a ``BrainModelAxis`` listing, per
grayordinate, its structure (``CIFTI_STRUCTURE_CORTEX_LEFT``, ...) and either a surface
vertex or a voxel. bigglm keeps every grayordinate of the file, in its order (CIFTI has
already left the medial wall out), and records the brain models in the store
(:mod:`bigglm.io.store`, geometry ``"grayordinate"``), from which
:func:`brain_model_axis` rebuilds nibabel's axis exactly.

The data are read in blocks of time points through nibabel's array proxy, so memory is
bounded by the block size whatever the series length; the file's SHA-256 is computed by
one more sequential read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.cifti2 import cifti2_axes

from bigglm.exceptions import StoreError, not_a_regular_file

__all__ = [
    "DenseSeries",
    "brain_model_axis",
    "brain_model_columns",
    "inspect_dtseries",
    "is_cifti",
]

PathLike = str | os.PathLike[str]

#: Bytes of float32 data read per block.
READ_BLOCK_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class DenseSeries:
    """A CIFTI-2 dense series, as its header tells it (no data read).

    Attributes
    ----------
    path : pathlib.Path
    image : nibabel.Cifti2Image
        Its data object is a proxy: reading it reads the file.
    series : nibabel.cifti2.SeriesAxis
    models : nibabel.cifti2.BrainModelAxis
    tr : float
        Seconds between time points (the series step, or the ``tr`` given).
    tr_from : str
        Where ``tr`` came from.
    """

    path: Path
    image: Any
    series: cifti2_axes.SeriesAxis
    models: cifti2_axes.BrainModelAxis
    tr: float
    tr_from: str

    @property
    def n_volumes(self) -> int:
        """Time points."""
        return int(self.series.size)  # type: ignore[arg-type]

    @property
    def n_grayordinates(self) -> int:
        """Grayordinates (columns of the store)."""
        return len(self.models)

    def blocks(self) -> Iterator[np.ndarray]:
        """The series as float32 ``(n, grayordinates)`` blocks of time points, in order."""
        step = max(1, READ_BLOCK_BYTES // (4 * max(self.n_grayordinates, 1)))
        proxy = self.image.dataobj
        for start in range(0, self.n_volumes, step):
            yield np.asarray(proxy[start : start + step], dtype=np.float32)

    def provenance(self) -> dict[str, Any]:
        """``path``, ``size`` and ``sha256`` of the file (read once more, in order)."""
        with open(self.path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return {"path": str(self.path), "size": self.path.stat().st_size, "sha256": digest}


def is_cifti(sources: Any) -> bool:
    """Whether ``sources`` is one CIFTI-2 file (told by its name: ``*.<kind>.nii``), alone
    or as a list of one (as the command line gives it).

    Examples
    --------
    >>> is_cifti("sub-01_space-fsLR_den-91k_bold.dtseries.nii"), is_cifti("bold.nii.gz")
    (True, False)
    >>> is_cifti(["x.dscalar.nii"]), is_cifti(["x.dtseries.nii", "y.dtseries.nii"])
    (True, False)
    """
    if isinstance(sources, Sequence) and not isinstance(sources, str) and len(sources) == 1:
        sources = sources[0]
    if not isinstance(sources, str | os.PathLike):
        return False
    name = Path(sources).name.lower()
    return any(name.endswith(f".{kind}.nii") for kind in _KINDS)


#: CIFTI-2 file kinds by their name's second extension (the CIFTI-2 standard, appendix A).
_KINDS = ("dtseries", "dscalar", "dlabel", "dconn", "ptseries", "pscalar", "pconn", "pdconn")


def inspect_dtseries(path: PathLike, *, tr: float | None = None) -> DenseSeries:
    """Open a CIFTI-2 dense series and check what its header says; no data are read.

    Parameters
    ----------
    path : path
        A ``*.dtseries.nii``.
    tr : float, optional
        Seconds between time points; default the series axis's step.

    Raises
    ------
    StoreError
        If the file is missing, not CIFTI-2, not a dense series (time x brain models), or
        has no usable repetition time.
    """
    path = Path(path).expanduser().resolve()
    problem = not_a_regular_file(path)
    if problem:
        raise StoreError(f"{path}: {problem}; give an existing *.dtseries.nii")
    try:
        image = nib.load(path)
    except Exception as err:
        raise StoreError(f"{path}: not a readable CIFTI-2 file ({err}); check the file") from err
    if not isinstance(image, nib.Cifti2Image):
        raise StoreError(
            f"{path}: is a {type(image).__name__}, not a CIFTI-2 file; give a dense series "
            "(*.dtseries.nii), or a NIfTI series by its .nii/.nii.gz name"
        )
    axes = [image.header.get_axis(i) for i in range(image.ndim)]
    kinds = [type(a).__name__ for a in axes]
    if kinds != ["SeriesAxis", "BrainModelAxis"]:
        raise StoreError(
            f"{path}: is a CIFTI-2 file with axes {kinds}, not a dense series; expected "
            "['SeriesAxis', 'BrainModelAxis'] (a *.dtseries.nii: time x grayordinates)"
        )
    chosen, source = _tr(path, axes[0], tr)
    return DenseSeries(path, image, axes[0], axes[1], chosen, source)


def _tr(path: Path, series: cifti2_axes.SeriesAxis, tr: float | None) -> tuple[float, str]:
    if tr is not None:
        if not (np.isfinite(tr) and tr > 0):
            raise StoreError(f"tr={tr!r}; give a positive repetition time in seconds")
        return float(tr), "given"
    if series.unit != "SECOND" or not series.step > 0:
        raise StoreError(
            f"{path}: its series axis has step {series.step} {series.unit}, not a "
            "repetition time in seconds; pass tr="
        )
    return float(series.step), "series axis step"


def brain_model_columns(models: cifti2_axes.BrainModelAxis) -> tuple[dict, dict]:
    """The store's per-column arrays and ``"cifti"`` attribute for a brain model axis.

    Returns
    -------
    columns : dict
        ``structure`` (int16 index into the structure list), ``vertex`` (int32, -1 for
        voxels), ``ijk`` (int32 ``(V, 3)``, -1 for vertices).
    attrs : dict
        ``structures``, ``nvertices``, ``affine``, ``volume_shape``.

    Examples
    --------
    >>> axis = cifti2_axes.BrainModelAxis.from_mask(np.ones(3), "CortexLeft")
    >>> columns, attrs = brain_model_columns(axis)
    >>> columns["vertex"].tolist(), attrs["structures"], attrs["nvertices"]
    ([0, 1, 2], ['CIFTI_STRUCTURE_CORTEX_LEFT'], {'CIFTI_STRUCTURE_CORTEX_LEFT': 3})
    """
    structures = list(dict.fromkeys(str(n) for n in models.name))
    code = {name: index for index, name in enumerate(structures)}
    columns = {
        "structure": np.array([code[str(n)] for n in models.name], dtype=np.int16),
        "vertex": np.asarray(models.vertex, dtype=np.int32),
        "ijk": np.asarray(models.voxel, dtype=np.int32).reshape(-1, 3),
    }
    has_volume = models.volume_mask.any()
    attrs = {
        "structures": structures,
        "nvertices": {str(k): int(v) for k, v in models.nvertices.items()},
        "affine": np.asarray(models.affine).tolist() if has_volume else None,
        "volume_shape": [int(s) for s in models.volume_shape] if has_volume else None,
    }
    return columns, attrs


def brain_model_axis(columns: Mapping[str, Any], attrs: Mapping[str, Any]) -> Any:
    """nibabel's ``BrainModelAxis`` from a store's arrays and ``"cifti"`` attribute.

    The inverse of :func:`brain_model_columns`.

    Examples
    --------
    >>> axis = cifti2_axes.BrainModelAxis.from_mask(np.array([1, 0, 1]), "CortexLeft")
    >>> brain_model_axis(*brain_model_columns(axis)) == axis
    True
    """
    structures = list(attrs["structures"])
    names = np.array([structures[i] for i in np.asarray(columns["structure"])], dtype=object)
    affine = None if attrs.get("affine") is None else np.asarray(attrs["affine"])
    shape = None if attrs.get("volume_shape") is None else tuple(attrs["volume_shape"])
    return cifti2_axes.BrainModelAxis(
        names,
        voxel=np.asarray(columns["ijk"]),
        vertex=np.asarray(columns["vertex"]),
        affine=affine,
        volume_shape=shape,
        nvertices=dict(attrs["nvertices"]),
    )
