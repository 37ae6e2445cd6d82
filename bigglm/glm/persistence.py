"""Writing and reading a fit's outputs: result stores, contrast maps and residual files.

A result store is a Zarr store holding the fitted variables of each run (one run at its
root, several as groups ``run-0``, ``run-1``, ...), every chunk checksummed
(:mod:`bigglm.io.integrity`). It is written under a temporary name beside its target and
renamed into place when complete (:func:`bigglm.io.artefacts.writing`), the completion
flag written last, so a store that opens is whole. Contrast maps and residuals are NIfTI
files (or, for residuals, run stores) written atomically as well. Every output path is
checked before anything is computed or written: a refused path costs no fit.

:class:`~bigglm.glm.result.GLMResult`'s ``to_zarr``, ``from_zarr``, ``to_nifti`` and
``write_residuals`` are the public entry points; these functions take its numbers as
callables, computed only once every path has been checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import xarray as xr

from bigglm.exceptions import DesignError, StoreError
from bigglm.glm import contrasts as con
from bigglm.typing import ContrastKind, ResidualFormat

__all__ = [
    "MapFormat",
    "check_voxel_grids",
    "map_paths",
    "read_result_store",
    "residual_paths",
    "write_contrast_maps",
    "write_residual",
    "write_result_store",
]


def write_result_store(
    path: str | os.PathLike[str],
    compute_runs: Callable[[], Sequence[xr.Dataset]],
    *,
    overwrite: bool,
    kind: str = "glm-result",
) -> Path:
    """Write the per-run result Datasets to a result store at ``path``, atomically.

    Parameters
    ----------
    path : path-like
    compute_runs : callable
        Returns the computed per-run Datasets; called once ``path`` has been checked.
    overwrite : bool
        As for :meth:`~bigglm.glm.result.GLMResult.to_zarr`.
    kind : str
        The artefact kind (:data:`bigglm.io.artefacts.KINDS`): ``"glm-result"``, or
        ``"group-result"`` for :meth:`bigglm.group.GroupResult.to_zarr`.

    Returns
    -------
    pathlib.Path
        The store's resolved path.

    Raises
    ------
    StoreError
        As :meth:`~bigglm.glm.result.GLMResult.to_zarr` says, before ``compute_runs``
        is called.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> run = xr.Dataset({"beta": (("regressor", "voxel"), np.ones((1, 2)))})
    >>> out = write_result_store(Path(tempfile.mkdtemp()) / "r.zarr", lambda: [run],
    ...                          overwrite=False)
    >>> read_result_store(out)[0]["beta"].shape
    (1, 2)
    """
    from bigglm.io.artefacts import check_replaceable, writing
    from bigglm.io.integrity import checksummed_encoding

    target = Path(path).expanduser().resolve()
    check_replaceable(target, kind, overwrite=overwrite)
    runs = compute_runs()
    with writing(target, kind, overwrite=overwrite, directory=True) as temp:
        for ds, group in zip(runs, _groups(len(runs)), strict=True):
            ds.to_zarr(
                temp,
                group=group,
                mode="w" if group is None else "a",
                consolidated=False,
                encoding=checksummed_encoding(ds),
            )
        _mark_complete(temp, len(runs))
    return target


def read_result_store(path: str | os.PathLike[str]) -> list[xr.Dataset]:
    """The per-run Datasets of a result store written by :func:`write_result_store`.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    list of xarray.Dataset
        One per run, in memory.

    Raises
    ------
    StoreError
        If the store is missing or incomplete, or a chunk fails its checksum.

    Examples
    --------
    >>> import tempfile
    >>> read_result_store(Path(tempfile.mkdtemp()) / "missing.zarr")
    Traceback (most recent call last):
    bigglm.exceptions.StoreError: ... is not a bigglm result store
    """
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except FileNotFoundError as err:
        raise StoreError(f"{path} is not a bigglm result store") from err
    info = root.attrs.get("bigglm_result")
    if not isinstance(info, dict) or not info.get("complete"):
        raise StoreError(f"{path} is not a complete bigglm result store; fit again")
    runs = [_load(path, group) for group in _groups(int(info["n_runs"]))]
    for ds in runs:
        ds.attrs.pop("bigglm_result", None)
    return runs


def write_contrast_maps(
    directory: str | os.PathLike[str],
    contrasts: con.ContrastSpec | Mapping[str, con.ContrastSpec],
    maps_of: Callable[[con.ContrastSpec], Mapping[str, xr.DataArray]],
    *,
    like: str | os.PathLike[str] | xr.Dataset,
    prefix: str,
    kind: ContrastKind,
    overwrite: bool,
    stats: Sequence[str] | None = None,
) -> list[Path]:
    """Write each contrast's maps as image files with BIDS-derivatives names.

    Named by :func:`~bigglm.glm.contrasts.map_file_name`, on the voxel grid of ``like``:
    NIfTI for a volume; for a run on surfaces, GIFTI (``*_hemi-L_..._statmap.shape.gii``,
    one per hemisphere) or CIFTI-2 (``*_statmap.dscalar.nii``), as its store holds them.

    Parameters
    ----------
    directory : path-like
        Created if missing.
    contrasts : one contrast, or dict name -> one contrast
        As for :meth:`~bigglm.glm.result.GLMResult.contrast`.
    maps_of : callable
        A contrast's maps by statistic (``effect``, ``variance``, ``stat``, ``p``, ``z``),
        as :func:`~bigglm.glm.result.contrast_maps` gives them; called once every path
        has been checked.
    like : store path or xarray.Dataset
        The voxel grid (or surfaces) of the images.
    prefix : str
        BIDS entities, e.g. ``"sub-01_task-faces"``.
    kind : {"t", "F"}
        Names the statistic's files.
    overwrite : bool
        As for :meth:`~bigglm.glm.result.GLMResult.to_nifti`.
    stats : sequence of str, optional
        The statistics ``maps_of`` gives (their paths are checked first); default
        ``effect``, ``variance``, ``kind``, ``p`` and ``z``. ``stat``, here or among the
        maps ``maps_of`` gives, is the file of ``kind`` (``stat-t`` or ``stat-F``).

    Returns
    -------
    list of pathlib.Path
        The files written, contrast by contrast, in the order ``maps_of`` gives them.

    Raises
    ------
    DesignError
        For contrasts whose names are invalid or whose file labels collide.
    StoreError
        As :meth:`~bigglm.glm.result.GLMResult.to_nifti` says for the maps' paths: every
        path is checked before ``maps_of`` is first called.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> grid = xr.Dataset({"mask": (("x", "y", "z"), np.ones((2, 1, 1), bool))},
    ...                   attrs={"affine": np.eye(4).tolist(), "tr": 2.0})
    >>> maps = {s: xr.DataArray(np.ones(2), dims="voxel") for s in ("effect", "stat")}
    >>> paths = write_contrast_maps(tempfile.mkdtemp(), "a", lambda spec: maps, like=grid,
    ...                             prefix="sub-01", kind="t", overwrite=False)
    >>> [p.name for p in paths]
    ['sub-01_contrast-a_stat-effect_statmap.nii.gz', 'sub-01_contrast-a_stat-t_statmap.nii.gz']
    """
    from bigglm.io.artefacts import check_replaceable

    named, labels = con.named_contrasts(contrasts), con.file_labels(contrasts)
    out_dir = _output_folder(directory)
    stats = ("effect", "variance", kind, "p", "z") if stats is None else tuple(stats)
    grid = MapFormat.of(like)
    for name in named:
        for stat in stats:
            for path in grid.paths(out_dir, prefix, labels[name], con.map_stat(stat, kind)):
                check_replaceable(path, "image", overwrite=overwrite)
    written = []
    for name, spec in named.items():
        for stat, values in maps_of(spec).items():
            paths = grid.paths(out_dir, prefix, labels[name], con.map_stat(stat, kind))
            grid.write(values, paths, overwrite=overwrite)
            written.extend(paths)
    return written


class MapFormat:
    """How the maps of a run are written: NIfTI on its grid, GIFTI per hemisphere, or
    CIFTI-2, as the run came in (its store's geometry, :mod:`bigglm.io.store`).

    Built from a run's Dataset (``MapFormat(ds)``) or store (``MapFormat.of(path)``);
    :meth:`paths` names a map's files (:func:`map_paths`), :meth:`write` writes them.
    """

    def __init__(self, like: xr.Dataset) -> None:
        from bigglm.io.geometry import geometry_of

        self.like = like
        self.geometry = geometry_of(like.attrs)
        self.hemis = list(like.attrs.get("hemispheres", {}))

    @classmethod
    def of(cls, like: str | os.PathLike[str] | xr.Dataset) -> MapFormat:
        from bigglm.io.store import open_run

        return cls(like if isinstance(like, xr.Dataset) else open_run(like))

    def paths(self, folder: Path, prefix: str, label: str, stat: str) -> list[Path]:
        """The file(s) of one map: one per hemisphere for GIFTI (``hemi`` entity)."""
        return map_paths(folder, prefix, label, stat, geometry=self.geometry, hemis=self.hemis)

    def write(self, values: xr.DataArray, paths: list[Path], *, overwrite: bool) -> None:
        from bigglm.io.export import to_cifti, to_gifti, to_nifti

        if self.geometry == "vertex":
            to_gifti(
                values, self.like, dict(zip(self.hemis, paths, strict=True)), overwrite=overwrite
            )
        elif self.geometry == "grayordinate":
            to_cifti(values, self.like, paths[0], overwrite=overwrite)
        else:
            to_nifti(values, self.like, paths[0], overwrite=overwrite)


def map_paths(
    folder: Path, prefix: str, label: str, stat: str, *, geometry: str, hemis: Sequence[str]
) -> list[Path]:
    """The file(s) of one map of a run of ``geometry`` (:func:`bigglm.io.geometry.geometry_of`).

    Named by :func:`~bigglm.glm.contrasts.map_file_name`: NIfTI for ``voxel``, CIFTI-2
    dense scalars for ``grayordinate``, and for ``vertex`` one GIFTI file per hemisphere
    of ``hemis``, the BIDS ``hemi`` entity before ``space``.

    Examples
    --------
    >>> for path in map_paths(Path("/o"), "sub-01_space-fsaverage5", "a", "z",
    ...                       geometry="vertex", hemis=["L", "R"]):
    ...     print(path.name)
    sub-01_hemi-L_space-fsaverage5_contrast-a_stat-z_statmap.shape.gii
    sub-01_hemi-R_space-fsaverage5_contrast-a_stat-z_statmap.shape.gii
    """
    if geometry == "vertex":
        return [
            folder / con.map_file_name(_with_hemi(prefix, h), label, stat, extension=".shape.gii")
            for h in hemis
        ]
    extension = ".dscalar.nii" if geometry == "grayordinate" else ".nii.gz"
    return [folder / con.map_file_name(prefix, label, stat, extension=extension)]


def _with_hemi(prefix: str, hemi: str) -> str:
    """``prefix`` with the BIDS ``hemi`` entity, before ``space`` as BIDS orders them.

    Examples
    --------
    >>> _with_hemi("sub-01_task-x_space-fsaverage5", "L"), _with_hemi("", "R")
    ('sub-01_task-x_hemi-L_space-fsaverage5', 'hemi-R')
    """
    entities = prefix.split("_") if prefix else []
    at = next((i for i, e in enumerate(entities) if e.startswith("space-")), len(entities))
    return "_".join([*entities[:at], f"hemi-{hemi}", *entities[at:]])


def residual_paths(
    directory: str | os.PathLike[str],
    prefix: str | Sequence[str],
    n_runs: int,
    *,
    whitened: bool,
    format: ResidualFormat,
    overwrite: bool,
) -> list[Path]:
    """The residual file of each run in ``directory``, each checked to be writable.

    Parameters
    ----------
    directory : path-like
        Created if missing.
    prefix : str or sequence of str
        BIDS entities per run (a single string for a single run).
    n_runs : int
    whitened : bool
    format : {"nifti", "zarr"}
    overwrite : bool
        Whether an existing output bigglm wrote may be replaced.

    Returns
    -------
    list of pathlib.Path
        ``directory / file_name(prefix)`` for each prefix, in run order
        (:func:`bigglm.glm.residuals.file_name`).

    Raises
    ------
    DesignError
        If there are not ``n_runs`` prefixes.
    StoreError
        If ``directory`` lies inside a store, or a path is taken by anything but an
        output of this kind bigglm wrote, or by one and ``overwrite`` is False.

    Examples
    --------
    >>> import tempfile
    >>> [p.name for p in residual_paths(tempfile.mkdtemp(), "sub-01", 1, whitened=True,
    ...                                 format="nifti", overwrite=False)]
    ['sub-01_desc-whitenedResiduals_bold.nii.gz']
    """
    from bigglm.glm.residuals import file_name
    from bigglm.io.artefacts import check_replaceable

    prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
    if len(prefixes) != n_runs:
        raise DesignError(
            f"got {len(prefixes)} prefixes for {n_runs} runs; give one per run "
            "(e.g. ['sub-01_task-a_run-1', 'sub-01_task-a_run-2'])"
        )
    out_dir = _output_folder(directory)
    paths = [out_dir / file_name(p, whitened=whitened, format=format) for p in prefixes]
    kind = "residuals-store" if format == "zarr" else "image"
    for path in paths:
        check_replaceable(path, kind, overwrite=overwrite)
    return paths


def check_voxel_grids(sources: Sequence[xr.Dataset]) -> None:
    """Check that every run's data carry the voxel grid that residual files need.

    Parameters
    ----------
    sources : sequence of xarray.Dataset
        The data of each run.

    Raises
    ------
    StoreError
        Naming the first run without a ``mask`` or an ``affine`` attribute.

    Examples
    --------
    >>> check_voxel_grids([xr.Dataset()])
    Traceback (most recent call last):
    bigglm.exceptions.StoreError: run 0 has no voxel grid (mask, affine); fit from a store ...
    """
    for index, like in enumerate(sources):
        if "mask" not in like or "affine" not in like.attrs:
            raise StoreError(
                f"run {index} has no voxel grid (mask, affine); fit from a store to write residuals"
            )


def write_residual(
    values: xr.DataArray,
    like: xr.Dataset,
    path: Path,
    *,
    format: ResidualFormat,
    overwrite: bool,
) -> None:
    """Write one run's residuals to ``path``: a NIfTI image, or a run store for ``"zarr"``.

    Parameters
    ----------
    values : xarray.DataArray
        ``(time, voxel)`` residuals, lazy (streamed as they are written).
    like : xarray.Dataset
        The run's data, giving the voxel grid.
    path : pathlib.Path
    format : {"nifti", "zarr"}
    overwrite : bool

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> grid = xr.Dataset({"mask": (("x", "y", "z"), np.ones((2, 1, 1), bool))},
    ...                   attrs={"affine": np.eye(4).tolist(), "tr": 2.0})
    >>> e = xr.DataArray(np.zeros((3, 2), "float32"), dims=("time", "voxel"))
    >>> path = Path(tempfile.mkdtemp()) / "e.nii.gz"
    >>> write_residual(e, grid, path, format="nifti", overwrite=False)
    >>> path.exists()
    True
    """
    from bigglm.glm.residuals import write_store
    from bigglm.io.export import to_nifti

    if format == "zarr":
        write_store(values, like, path, overwrite=overwrite)
    else:
        to_nifti(values, like, path, overwrite=overwrite)


def _output_folder(directory: str | os.PathLike[str]) -> Path:
    """``directory``, checked to lie outside any store, then created if missing."""
    from bigglm.io.artefacts import check_outside_stores

    out_dir = Path(directory)
    check_outside_stores(out_dir / "x")  # before the folder is made
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _groups(n_runs: int) -> list[str | None]:
    """The Zarr group of each run of a result store: the root for one run."""
    return [None] if n_runs == 1 else [f"run-{i}" for i in range(n_runs)]


def _load(path: str | os.PathLike[str], group: str | None) -> xr.Dataset:
    """One run of a result store, in memory; a chunk failing its checksum is a StoreError.

    Read here, by threads, whatever Dask client is the default: the values end in this
    process anyway, and a round trip through a cluster's workers costs a task per chunk
    and a transfer per variable (3 s for the demo subject's result, 0.1 s here)."""
    try:
        return xr.open_zarr(path, group=group, consolidated=False).load(scheduler="threads")
    except ValueError as err:
        if "checksum" not in str(err):
            raise
        raise StoreError(
            f"{path}: a chunk of the result store is damaged (checksum mismatch); fit again "
            "and write the result with overwrite=True"
        ) from err


def _mark_complete(store: Path, n_runs: int) -> None:
    """Write the completion flag last."""
    import zarr

    root = zarr.open_group(str(store), mode="a")
    root.attrs["bigglm_result"] = {"n_runs": n_runs, "complete": True}
