"""GroupResult: a fitted group model, and its contrasts and maps.

A result holds, per voxel, ``beta(column, voxel)``, the information matrix
``gram(column, column2, voxel)`` (``X_v'X_v`` for OLS, ``X_v'W_vX_v`` for mixed effects,
with the subjects present at the voxel), ``sigma2(voxel)`` (the residual variance for
OLS; for mixed effects the covariance scale, 1 or the Knapp–Hartung factor), ``dof``,
``n`` (subjects present), ``rank`` and, for mixed effects, ``tau2(variance_group,
voxel)``. The covariance of the betas is ``sigma2 * gram^+``, so any contrast follows
without touching the data again.

A contrast estimable under the whole design may not be estimable at a voxel whose
subjects leave a column empty (all patients missing there, say): it is NaN there, and
the count is in the contrast's attrs (``n_not_estimable``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr

from bigglm.exceptions import StoreError
from bigglm.glm import contrasts as con
from bigglm.glm.orchestration import over_voxel_slices
from bigglm.glm.result import contrast_dataset, contrast_maps
from bigglm.group.voxelwise import estimable, pinv_and_rank
from bigglm.typing import ContrastKind

__all__ = ["GroupResult"]

logger = logging.getLogger(__name__)


class GroupResult:
    """A group model fitted at every voxel (from :func:`bigglm.group.fit`).

    Parameters
    ----------
    dataset : xarray.Dataset
        The fitted variables (see the module docstring), in memory.

    Examples
    --------
    >>> import pandas as pd
    >>> from bigglm.group import fit
    >>> subjects = [f"sub-{i}" for i in range(10)]
    >>> y = np.random.default_rng(0).normal(2.0, 1.0, size=(10, 3))
    >>> ds = xr.Dataset({"effect": (("subject", "voxel"), y)}, coords={"subject": subjects})
    >>> res = fit(ds, pd.DataFrame({"intercept": np.ones(10)}, index=subjects))
    >>> bool((res.contrast("intercept")["stat"] > 3).all())
    True
    """

    def __init__(self, dataset: xr.Dataset) -> None:
        self._ds = dataset
        self._inverse: np.ndarray | None = None  # gram^+ per voxel, on first contrast

    def _pseudo_inverse(self) -> np.ndarray:
        """Every voxel's ``gram^+`` (P x P x V), computed once for all contrasts."""
        if self._inverse is None:
            gram = self._ds["gram"].values

            def piece(voxels: slice) -> np.ndarray:
                return pinv_and_rank(np.nan_to_num(gram[:, :, voxels]))[0]

            parts = over_voxel_slices(piece, self._ds.sizes["voxel"])
            self._inverse = np.concatenate(parts, axis=-1)
        return self._inverse

    @property
    def dataset(self) -> xr.Dataset:
        """The fitted variables."""
        return self._ds

    @property
    def beta(self) -> xr.DataArray:
        """``beta(column, voxel)``."""
        return self._ds["beta"]

    @property
    def sigma2(self) -> xr.DataArray:
        """Residual variance (OLS) or covariance scale (mixed effects) per voxel."""
        return self._ds["sigma2"]

    @property
    def dof(self) -> xr.DataArray:
        """Residual degrees of freedom per voxel, ``n - rank``."""
        return self._ds["dof"]

    @property
    def n(self) -> xr.DataArray:
        """Subjects present at each voxel."""
        return self._ds["n"]

    @property
    def tau2(self) -> xr.DataArray:
        """Between-subject variance per variance group and voxel (mixed effects only)."""
        if "tau2" not in self._ds:
            raise AttributeError("an OLS fit has no tau2; fit with model='mixed'")
        return self._ds["tau2"]

    @property
    def design(self) -> xr.DataArray:
        """The design, ``(subject, column)``."""
        return self._ds["design"]

    @property
    def columns(self) -> list[str]:
        """The design's column names."""
        return [str(c) for c in self._ds["column"].values]

    def __repr__(self) -> str:
        ds = self._ds
        return (
            f"<GroupResult model={ds.attrs.get('model')}, {ds.sizes['subject']} subjects, "
            f"{ds.sizes['voxel']} voxels, {ds.sizes['column']} columns>"
        )

    # --- contrasts -------------------------------------------------------------
    def contrast(
        self,
        contrasts: con.ContrastSpec | Mapping[str, con.ContrastSpec],
        *,
        kind: ContrastKind = "t",
    ) -> xr.Dataset:
        """Effect, variance, statistic, p, z and dof of one or several contrasts.

        Parameters
        ----------
        contrasts : one contrast, or dict name -> one contrast
            As for :meth:`bigglm.GLMResult.contrast`: expressions over the design's
            column names (``"patients - controls"``), weight vectors, weights dicts,
            lists of expressions or matrices for F.
        kind : {"t", "F"}

        Returns
        -------
        xarray.Dataset
            ``effect``, ``variance``, ``stat``, ``p`` (upper tail), ``z`` and ``dof``
            per voxel; NaN where the voxel was not fitted or the contrast is not
            estimable with the subjects present there (``attrs["n_not_estimable"]``).

        Raises
        ------
        DesignError
            For an invalid contrast or kind, or a contrast not estimable under the
            whole design.

        Examples
        --------
        >>> import pandas as pd
        >>> from bigglm.group import fit
        >>> s = [f"sub-{i}" for i in range(8)]
        >>> x = pd.DataFrame({"a": [1.0] * 4 + [0.0] * 4, "b": [0.0] * 4 + [1.0] * 4}, index=s)
        >>> y = np.random.default_rng(1).normal(size=(8, 2))
        >>> y[:4, 1] = np.nan  # no subject of group a at voxel 1
        >>> ds = xr.Dataset({"effect": (("subject", "voxel"), y)}, coords={"subject": s})
        >>> out = fit(ds, x, min_subjects=3).contrast("a - b")
        >>> bool(np.isfinite(out["stat"][0])), bool(np.isnan(out["stat"][1]))
        (True, True)
        >>> out.attrs["n_not_estimable"]
        1
        """
        con.check_kind(kind)
        named = con.named_contrasts(contrasts)
        outputs = [self._one_contrast(name, spec, kind) for name, spec in named.items()]
        if con.is_named(contrasts):
            return xr.concat(outputs, dim=xr.Variable("contrast", list(named)), join="outer")
        return outputs[0]

    def _one_contrast(self, name: str, spec: con.ContrastSpec, kind: ContrastKind) -> xr.Dataset:
        ds = self._ds
        weights = con.estimable_contrast(
            spec, ds["design"].values, self.columns, kind=kind, name=name
        )
        beta, gram = ds["beta"].values, ds["gram"].values
        sigma2, dof = ds["sigma2"].values, ds["dof"].values

        pseudo_inverse = self._pseudo_inverse()

        def piece(voxels: slice) -> tuple[np.ndarray, ...]:
            g = np.nan_to_num(gram[:, :, voxels])
            inverse = pseudo_inverse[:, :, voxels]
            ok = estimable(weights, g, inverse) & np.isfinite(sigma2[voxels])
            unscaled = np.einsum("qi,ijv,rj->qrv", weights, inverse, weights)
            effect = weights @ np.nan_to_num(beta[:, voxels])
            covariance = unscaled * sigma2[voxels]
            effect[:, ~ok] = np.nan
            covariance[:, :, ~ok] = np.nan
            d = dof[voxels]
            test = con.t_test if kind == "t" else con.f_test
            args = (effect[0], covariance[0, 0], d) if kind == "t" else (effect, covariance, d)
            tested = test(*args)
            return effect, covariance, tested["stat"], tested["p"], tested["z"], ~ok

        parts = over_voxel_slices(piece, ds.sizes["voxel"])
        effect, covariance, stat, p, z, bad = (
            np.concatenate([part[i] for part in parts], axis=-1) for i in range(6)
        )
        tested = {"stat": stat, "p": p, "z": z}
        out = contrast_dataset(name, kind, effect, covariance, tested, dof, weights)
        not_estimable = int((bad & np.isfinite(sigma2)).sum())
        if not_estimable:
            logger.info(
                "contrast %r: not estimable at %d voxels (their subjects leave a column "
                "empty): NaN there",
                name,
                not_estimable,
            )
        out.attrs["n_not_estimable"] = not_estimable
        return out

    # --- output ----------------------------------------------------------------
    def grid(self) -> xr.Dataset:
        """The voxel grid of the maps: mask and affine of the group store.

        Raises
        ------
        StoreError
            If the result was fitted from a Dataset with no mask or affine.
        """
        ds = self._ds
        if "mask" not in ds or "affine" not in ds.attrs:
            raise StoreError(
                "this result has no voxel grid (fitted from a Dataset without mask and "
                "affine); fit from a group store to write NIfTI maps"
            )
        return xr.Dataset({"mask": ds["mask"]}, attrs={"affine": ds.attrs["affine"], "tr": None})

    def to_nifti(
        self,
        directory: str | os.PathLike[str],
        contrasts: con.ContrastSpec | Mapping[str, con.ContrastSpec],
        *,
        prefix: str = "group",
        kind: ContrastKind = "t",
        overwrite: bool = False,
    ) -> list[Path]:
        """Write contrast maps as NIfTI files with BIDS-derivatives names.

        ``<prefix>_contrast-<label>_stat-<stat>_statmap.nii.gz`` for stat in effect,
        variance, t or F, p and z, as :meth:`bigglm.GLMResult.to_nifti`, on the group
        store's grid (NaN outside the analysis mask and where not fitted).

        Parameters
        ----------
        directory : path-like
        contrasts : as for :meth:`contrast`
        prefix : str
            BIDS entities of the maps (default ``"group"``).
        kind : {"t", "F"}
        overwrite : bool
            Replace maps bigglm wrote; anything else is refused.

        Returns
        -------
        list of pathlib.Path

        Raises
        ------
        DesignError
            As :meth:`contrast`, before any file is written.
        StoreError
            If the result has no voxel grid, or a map's path may not be written.
        """
        like = self.grid()
        kind = con.check_kind(kind)

        def maps_of(spec: con.ContrastSpec) -> dict[str, xr.DataArray]:
            return contrast_maps(self.contrast(spec, kind=kind))

        from bigglm.glm.persistence import write_contrast_maps

        return write_contrast_maps(
            directory, contrasts, maps_of, like=like, prefix=prefix, kind=kind, overwrite=overwrite
        )

    def to_zarr(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the result to a Zarr store, atomically (:meth:`from_zarr` reads it).

        Parameters
        ----------
        path : path-like
        overwrite : bool
            Replace a group result bigglm wrote; anything else is refused.

        Returns
        -------
        pathlib.Path

        Examples
        --------
        >>> import pandas as pd, tempfile
        >>> from bigglm.group import fit
        >>> s = [f"sub-{i}" for i in range(6)]
        >>> ds = xr.Dataset({"effect": (("subject", "voxel"), np.arange(12.0).reshape(6, 2))},
        ...                 coords={"subject": s})
        >>> res = fit(ds, pd.DataFrame({"intercept": np.ones(6)}, index=s))
        >>> back = GroupResult.from_zarr(res.to_zarr(Path(tempfile.mkdtemp()) / "g.zarr"))
        >>> back.beta.values.tolist()
        [[5.0, 6.0]]
        """
        from bigglm.glm.persistence import write_result_store

        ds = self._ds.assign_coords(
            {k: self._ds[k].astype(str).astype(object) for k in ("column", "column2", "subject")}
        )
        return write_result_store(path, lambda: [ds], overwrite=overwrite, kind="group-result")

    @classmethod
    def from_zarr(cls, path: str | os.PathLike[str]) -> GroupResult:
        """Load a result written by :meth:`to_zarr` (into memory).

        Raises
        ------
        StoreError
            If ``path`` is not a complete group result.
        """
        from bigglm.glm.persistence import read_result_store
        from bigglm.io.artefacts import kind_of

        if kind_of(path) != "group-result":
            raise StoreError(f"{path} is not a bigglm group result; write one with to_zarr")
        (ds,) = read_result_store(path)
        ds.attrs.pop("bigglm_artefact", None)
        return cls(ds)
