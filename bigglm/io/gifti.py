"""GIFTI functional series (``*.func.gii``) and meshes (``*.surf.gii``), as bigglm reads them.

A functional series is one file per hemisphere, as fMRIPrep writes it
(``*_space-fsaverage5_hemi-L_bold.func.gii``): one data array per time point, each one
value per mesh vertex. GIFTI is XML, so a file is read whole (nibabel decodes every data
array): converting a run holds both hemispheres' series in memory (``vertices x
volumes x 4`` bytes, 80 MB for 1000 volumes on fsaverage5), unlike a NIfTI series,
which is streamed.

GIFTI has no standard field for the repetition time (the ``TimeStep`` metadata some
tools write is often 0), so :func:`bigglm.convert` needs ``tr`` for a GIFTI series; two
hemispheres that both carry a non-zero ``TimeStep`` must agree on it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bigglm.exceptions import StoreError, not_a_regular_file
from bigglm.io.geometry import HEMISPHERES

__all__ = [
    "STRUCTURES",
    "HemisphereSeries",
    "hemisphere_paths",
    "is_gifti",
    "read_hemispheres",
    "read_mesh",
    "surface_mask",
]

PathLike = str | os.PathLike[str]

#: GIFTI's ``AnatomicalStructurePrimary`` of each hemisphere.
STRUCTURES = {"L": "CortexLeft", "R": "CortexRight"}

_HEMI_ENTITY = re.compile(r"(?:^|_)hemi-([LR])(?:_|\.)")


@dataclass(frozen=True, eq=False)
class HemisphereSeries:
    """One hemisphere's functional series, read whole.

    Attributes
    ----------
    hemisphere : {"L", "R"}
    path : pathlib.Path
    data : numpy.ndarray
        float32 ``(T, n_vertices)``.
    time_step : float or None
        The ``TimeStep`` metadata of the first data array, when present and non-zero.
    provenance : dict
        ``path``, ``size`` and ``sha256`` of the file.
    """

    hemisphere: str
    path: Path
    data: np.ndarray
    time_step: float | None
    provenance: dict[str, Any]

    @property
    def n_volumes(self) -> int:
        """Time points of the series."""
        return int(self.data.shape[0])

    @property
    def n_vertices(self) -> int:
        """Vertices of the hemisphere's mesh."""
        return int(self.data.shape[1])


def is_gifti(sources: Any) -> bool:
    """Whether ``sources`` name GIFTI files (a path, a list of them, or a hemisphere mapping).

    Examples
    --------
    >>> is_gifti("sub-01_hemi-L_bold.func.gii"), is_gifti(["a.nii.gz"])
    (True, False)
    >>> is_gifti({"L": "l.func.gii", "R": "r.func.gii"})
    True
    """
    if isinstance(sources, Mapping):
        sources = list(sources.values())
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    names = [str(s).lower() for s in sources]
    return bool(names) and all(name.endswith(".gii") for name in names)


def hemisphere_paths(sources: PathLike | Sequence[PathLike] | Mapping[str, PathLike]) -> dict:
    """The GIFTI file of each hemisphere, in :data:`HEMISPHERES` order.

    A mapping gives the hemispheres by its keys (``"L"``, ``"R"``); paths alone are
    told apart by their BIDS ``hemi-L``/``hemi-R`` entity, else by the file's
    ``AnatomicalStructurePrimary`` metadata.

    Raises
    ------
    StoreError
        If a hemisphere cannot be told, is given twice, or a key is not ``L``/``R``.

    Examples
    --------
    >>> hemisphere_paths(["x_hemi-R_bold.func.gii", "x_hemi-L_bold.func.gii"])
    {'L': PosixPath('x_hemi-L_bold.func.gii'), 'R': PosixPath('x_hemi-R_bold.func.gii')}
    """
    if isinstance(sources, Mapping):
        bad = [key for key in sources if key not in HEMISPHERES]
        if bad:
            raise StoreError(
                f"GIFTI sources are keyed {sorted(map(str, sources))}; expected the "
                f"hemispheres {list(HEMISPHERES)} as keys, e.g. {{'L': left, 'R': right}}"
            )
        pairs = [(str(key), Path(path)) for key, path in sources.items()]
    else:
        paths = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
        pairs = [(_hemisphere_of(Path(p)), Path(p)) for p in paths]
    found: dict[str, Path] = {}
    for hemi, path in pairs:
        if hemi in found:
            raise StoreError(
                f"{found[hemi]} and {path} are both hemisphere {hemi}; give one file per "
                "hemisphere (the left and the right of one run)"
            )
        found[hemi] = path
    return {hemi: found[hemi] for hemi in HEMISPHERES if hemi in found}


def _hemisphere_of(path: Path) -> str:
    match = _HEMI_ENTITY.search(path.name)
    if match:
        return match.group(1)
    structure = _image(path).meta.get("AnatomicalStructurePrimary", "")
    for hemi, name in STRUCTURES.items():
        if structure == name:
            return hemi
    raise StoreError(
        f"{path}: cannot tell its hemisphere (no hemi-L/hemi-R in the name, "
        f"AnatomicalStructurePrimary {structure!r}); give {{'L': left, 'R': right}}"
    )


def read_hemispheres(
    sources: PathLike | Sequence[PathLike] | Mapping[str, PathLike],
) -> list[HemisphereSeries]:
    """Read the functional series of each hemisphere of one run, and check they match.

    Raises
    ------
    StoreError
        A file missing or not GIFTI, a file without time points, or hemispheres of
        different runs (other numbers of time points, or other ``TimeStep``).
    """
    series = [_read_series(hemi, path) for hemi, path in hemisphere_paths(sources).items()]
    _check_same_run(series)
    return series


def _read_series(hemi: str, path: Path) -> HemisphereSeries:
    raw = _read_bytes(path)
    image = _parse(raw, path)
    arrays = [np.asarray(d.data) for d in image.darrays]
    if not arrays or any(a.ndim != 1 for a in arrays) or len({a.size for a in arrays}) != 1:
        shapes = sorted({a.shape for a in arrays})
        raise StoreError(
            f"{path}: holds no time points (data arrays of shapes {shapes}); expected a "
            "functional series, one 1-D array of vertex values per time point "
            "(*.func.gii), not a mesh or a single map"
        )
    data = np.stack(arrays).astype(np.float32, copy=False)
    step = _time_step(image.darrays[0].meta)
    provenance = {"path": str(path), "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return HemisphereSeries(hemi, path, data, step, provenance)


def _time_step(meta: Any) -> float | None:
    try:
        value = float(meta.get("TimeStep", "0"))
    except ValueError:
        return None
    return value if value > 0 else None


def _check_same_run(series: list[HemisphereSeries]) -> None:
    first = series[0]
    for other in series[1:]:
        if other.n_volumes != first.n_volumes:
            raise StoreError(
                f"{first.path} has {first.n_volumes} time points but {other.path} has "
                f"{other.n_volumes}; the hemispheres are of different runs: give the left "
                "and the right of one run"
            )
        if None not in (first.time_step, other.time_step) and other.time_step != first.time_step:
            raise StoreError(
                f"{first.path} has TimeStep {first.time_step} but {other.path} has "
                f"{other.time_step}; the hemispheres are of different runs: give the left "
                "and the right of one run"
            )


def _read_bytes(path: Path) -> bytes:
    problem = not_a_regular_file(path)
    if problem:
        raise StoreError(f"{path}: {problem}; give an existing GIFTI file")
    return path.read_bytes()


def _parse(raw: bytes, path: Path) -> nib.GiftiImage:
    try:
        return nib.GiftiImage.from_bytes(raw)
    except Exception as err:
        raise StoreError(f"{path}: not a readable GIFTI file ({err}); check the file") from err


def _image(path: Path) -> nib.GiftiImage:
    return _parse(_read_bytes(path), path)


def read_mesh(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The vertex coordinates ``(N, 3)`` and triangles ``(F, 3)`` of a GIFTI mesh.

    Raises
    ------
    StoreError
        If the file is missing, not GIFTI, or has no pointset and triangle arrays.

    Examples
    --------
    >>> from nilearn.datasets import load_fsaverage
    >>> mesh = load_fsaverage("fsaverage5")["pial"].parts["left"]
    >>> mesh.faces.shape[1]
    3
    """
    path = Path(path)
    image = _image(path)
    points = [d.data for d in image.darrays if d.intent == nib.nifti1.intent_codes["pointset"]]
    faces = [d.data for d in image.darrays if d.intent == nib.nifti1.intent_codes["triangle"]]
    if len(points) != 1 or len(faces) != 1:
        raise StoreError(
            f"{path}: has {len(points)} pointset and {len(faces)} triangle arrays; expected "
            "a surface mesh (*.surf.gii) with one of each"
        )
    return np.asarray(points[0], dtype=np.float64), np.asarray(faces[0], dtype=np.int64)


def surface_mask(
    mask: Mapping[str, Any] | None, series: list[HemisphereSeries]
) -> dict[str, np.ndarray]:
    """Per hemisphere, the vertices to keep.

    With no ``mask``, the vertices whose values change over time: the medial wall,
    constant or zero in fMRIPrep's outputs, is left out, and so are vertices NaN at
    every time point (bigglm's own GIFTI outputs have NaN there); a vertex with some
    NaN or Inf values is dropped by the conversion, with a warning. A given mask maps
    each hemisphere to a boolean array or a GIFTI file of one value per vertex (non-zero:
    keep).

    Raises
    ------
    StoreError
        If the mask lacks a hemisphere or has another vertex count than the series.
    """
    if mask is None:
        return {s.hemisphere: _varies(s.data) for s in series}  # no medial wall
    out = {}
    for s in series:
        if s.hemisphere not in mask:
            raise StoreError(
                f"the mask has no hemisphere {s.hemisphere} (keys {sorted(mask)}); give one "
                "mask per hemisphere converted"
            )
        out[s.hemisphere] = _mask_values(mask[s.hemisphere], s)
    return out


def _varies(data: np.ndarray) -> np.ndarray:
    """Vertices not constant over time and not NaN throughout (as :func:`bigglm.to_gifti`
    writes vertices without data); one with some NaN or Inf values counts as varying, for
    the conversion to drop with a warning."""
    with np.errstate(invalid="ignore"):
        constant = np.all(data == data[:1], axis=0)
    return ~constant & ~np.isnan(data).all(axis=0)


def _mask_values(given: Any, s: HemisphereSeries) -> np.ndarray:
    if isinstance(given, str | os.PathLike):
        arrays = _image(Path(given)).darrays
        values = np.asarray(arrays[0].data) if arrays else np.zeros(0)
        name = str(given)
    else:
        values, name = np.asarray(given), f"the mask of hemisphere {s.hemisphere}"
    if values.shape != (s.n_vertices,):
        raise StoreError(
            f"{name} has shape {values.shape} but {s.path} has {s.n_vertices} vertices; "
            "give a mask on the same mesh"
        )
    return (values != 0) & np.isfinite(values)
