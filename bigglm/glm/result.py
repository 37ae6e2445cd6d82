"""GLMResult: the fitted statistics of one or several runs, and what can be derived.

A result holds, per run, an xarray Dataset with ``beta(regressor, voxel)``,
``sigma2(voxel)``, ``dof``, ``ar(lag, voxel)`` for AR models, ``status(voxel)``, the
design ``design(time, regressor)`` and provenance attributes. Those are all that
contrasts need: ``(X'X)^+`` follows from the design and, for AR(p) noise, each voxel's
``(X~'X~)^+`` follows from the design and the voxel's AR coefficients, so any number of
contrasts are computed without touching the data again.

This module holds the views of a result and its contrasts. How the lazy fit is computed
is :mod:`bigglm.glm.orchestration`; how results, maps and residuals are written and read
back is :mod:`bigglm.glm.persistence`. :class:`GLMResult`'s methods are the public entry
points to both.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from dask.delayed import Delayed

from bigglm.exceptions import DesignError, StoreError
from bigglm.glm import contrasts as con
from bigglm.glm import persistence
from bigglm.glm.finish import STATUS_FLAGS, ar_contrast_variance
from bigglm.glm.linalg import voxels_per_batch
from bigglm.glm.orchestration import compute_blocks, on_scheduler, over_voxel_slices
from bigglm.glm.stats import DesignTerms
from bigglm.typing import ContrastKind, ProgressCallback, ResidualFormat

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["GLMResult", "contrast_dataset", "contrast_maps"]

logger = logging.getLogger(__name__)

_FITTED = ("beta", "sigma2", "status", "ar", "film_covariance", "film_autocorrelation")


class GLMResult:
    """Fitted GLM statistics of one or several runs (from :func:`bigglm.fit`).

    Parameters
    ----------
    runs : list of xarray.Dataset
        One result Dataset per run (lazy or computed).
    finishes : list of list of (slice, Delayed), optional
        Per run, the voxel range and finish task of each voxel block (lazy results).
    client : distributed.Client, optional
        Where lazy results are computed.
    like : list, optional
        Per run, the store path or Dataset giving the voxel grid for NIfTI output.

    Examples
    --------
    >>> import pandas as pd
    >>> import bigglm
    >>> x = pd.DataFrame({"a": np.tile([1.0, 0.0], 8), "b": np.tile([0.0, 1.0], 8)})
    >>> y = np.random.default_rng(1).normal(size=(16, 4)) + 3 * x[["a"]].to_numpy()
    >>> ds = xr.Dataset({"bold": (("time", "voxel"), y)})
    >>> res = bigglm.fit(ds, x)
    >>> float(res.contrast("a - b")["stat"].min()) > 3
    True
    """

    def __init__(
        self,
        runs: list[xr.Dataset],
        finishes: list[list[tuple[slice, Delayed]]] | None = None,
        *,
        client: Client | None = None,
        like: list[Any] | None = None,
    ) -> None:
        self._runs = runs
        self._finishes = finishes
        self._client = client
        self._like = like
        self._computed: GLMResult | None = None if finishes else self

    # --- views -----------------------------------------------------------------
    @property
    def runs(self) -> list[xr.Dataset]:
        """The per-run result Datasets (in memory once the result has been computed)."""
        return list(self._computed._runs if self._computed is not None else self._runs)

    @property
    def dataset(self) -> xr.Dataset:
        """The fitted variables; with several runs, stacked along ``run`` (outer join)."""
        runs = self.runs
        if len(runs) == 1:
            return runs[0]
        keep = [ds[[v for v in (*_FITTED, "dof") if v in ds]] for ds in runs]
        return xr.concat(keep, dim="run", join="outer")

    @property
    def beta(self) -> xr.DataArray:
        """``beta(regressor, voxel)`` (``(run, regressor, voxel)`` for several runs)."""
        return self.dataset["beta"]

    @property
    def sigma2(self) -> xr.DataArray:
        """Residual variance per voxel (of the whitened model for AR noise)."""
        return self.dataset["sigma2"]

    @property
    def dof(self) -> xr.DataArray:
        """Residual degrees of freedom, ``T - rank(X)``."""
        return self.dataset["dof"]

    @property
    def ar(self) -> xr.DataArray:
        """``ar(lag, voxel)``: per-voxel AR coefficients (AR models only)."""
        if "ar" not in self.dataset:
            raise AttributeError("an OLS fit has no AR coefficients; fit with noise='ar1'")
        return self.dataset["ar"]

    @property
    def designs(self) -> list[xr.DataArray]:
        """The design matrix of each run."""
        return [ds["design"] for ds in self.runs]

    def __repr__(self) -> str:
        state = "lazy" if self._computed is None else "computed"
        first = self._runs[0]
        return (
            f"<GLMResult {len(self._runs)} run(s), {first.sizes['voxel']} voxels, "
            f"{first.sizes['regressor']} regressors, noise={first.attrs.get('noise')}, {state}>"
        )

    # --- computing -------------------------------------------------------------
    def compute(self, progress: ProgressCallback | None = None) -> GLMResult:
        """Run the fit (one pass over the data) and return an in-memory result.

        The computed result is cached: computing again, asking for contrasts or
        writing outputs never reads the data a second time.

        Parameters
        ----------
        progress : callable, optional
            Called with ``(done, total)`` voxel blocks.

        Returns
        -------
        GLMResult

        Examples
        --------
        >>> import pandas as pd, bigglm
        >>> ds = xr.Dataset({"bold": (("time", "voxel"), np.arange(20.0).reshape(10, 2) ** 2)})
        >>> res = bigglm.fit(ds, pd.DataFrame({"c": np.ones(10)})).compute()
        >>> res.beta.values
        array([[114., 133.]])
        """
        if self._computed is not None:
            return self._computed
        assert self._finishes is not None
        tasks = [fin for run in self._finishes for _, fin in run]
        logger.info("fitting %d voxel blocks of %d run(s)", len(tasks), len(self._runs))
        started = time.perf_counter()
        values = iter(compute_blocks(tasks, self._client, progress))
        logger.info("fit done in %.1f s", time.perf_counter() - started)
        runs = [
            self._assemble(ds, [next(values) for _ in blocks])
            for ds, blocks in zip(self._runs, self._finishes, strict=True)
        ]
        self._computed = GLMResult(runs, client=self._client, like=self._like)
        return self._computed

    @staticmethod
    def _assemble(lazy: xr.Dataset, blocks: list[dict[str, np.ndarray]]) -> xr.Dataset:
        """Replace the lazy fitted variables with the computed blocks."""
        out = lazy.copy()
        for name in _FITTED:
            if name in lazy:
                data = np.concatenate([b[name] for b in blocks], axis=-1)
                out[name] = (lazy[name].dims, data, lazy[name].attrs)
        status = out["status"].values
        for flag, value in STATUS_FLAGS.items():
            if not value:
                continue
            count = int((status == value).sum())
            out.attrs[f"n_{flag}"] = count
            if count:
                logger.warning("%d %s voxels: their statistics are NaN", count, flag)
        return out

    # --- contrasts -------------------------------------------------------------
    def contrast(
        self,
        contrasts: con.ContrastSpec | Mapping[str, con.ContrastSpec],
        *,
        kind: ContrastKind = "t",
        precision_weighted: bool = False,
    ) -> xr.Dataset:
        """Effect, variance, statistic, p, z and dof of one or several contrasts.

        Parameters
        ----------
        contrasts : one contrast, or dict name -> one contrast
            One contrast: an expression over column names (``"faces - houses"``), a
            weight vector (one weight per column), a weights dict ``{column: weight}``
            (``{"faces": 1, "houses": -1}`` is faces - houses), or for F a list of
            expressions or a (q, P) matrix. Several: a dict ``{name: one contrast}``.
            See :mod:`bigglm.glm.contrasts` for what is refused.
        kind : {"t", "F"}
            Exactly ``"t"`` or ``"F"``.
        precision_weighted : bool
            For several runs: weight each run's effect by its inverse variance
            (default: plain mean, as nilearn).

        Returns
        -------
        xarray.Dataset
            ``effect``, ``variance``, ``stat`` (t or F), ``p`` (upper tail), ``z``,
            ``dof``; with named contrasts, each has a leading ``contrast`` dimension. For F,
            ``effect`` is (row, voxel) and ``variance`` the (row, row2, voxel)
            covariance of the effect.

        Raises
        ------
        DesignError
            For an invalid kind, an invalid or ambiguous contrast (unknown columns, NaN
            weights, a dict mixing weights and contrasts, names whose file labels
            collide), or contrasts not estimable under the design.

        Examples
        --------
        >>> import pandas as pd, bigglm
        >>> x = pd.DataFrame({"a": np.tile([1.0, 0.0], 5), "constant": 1.0})
        >>> y = np.random.default_rng(0).normal(size=(10, 2))
        >>> res = bigglm.fit(xr.Dataset({"bold": (("time", "voxel"), y)}), x)
        >>> sorted(res.contrast({"a": "a", "F": ["a", "constant"]}, kind="F").data_vars)
        ['dof', 'effect', 'p', 'stat', 'variance', 'z']
        >>> res.contrast({"a": 1, "constant": -1}).attrs["name"]  # one contrast, by weights
        'a - constant'
        """
        con.check_kind(kind)
        named = con.named_contrasts(contrasts)
        computed = self.compute()
        outputs = [computed._one_contrast(n, s, kind, precision_weighted) for n, s in named.items()]
        if con.is_named(contrasts):
            return xr.concat(outputs, dim=xr.Variable("contrast", list(named)), join="outer")
        return outputs[0]

    def _one_contrast(
        self, name: str, spec: con.ContrastSpec, kind: ContrastKind, weighted: bool
    ) -> xr.Dataset:
        """One contrast on a computed result, combined across runs if several.

        The per-voxel work (AR variances, the t or F distribution's tails) runs over
        voxel slices on a thread pool: it is numpy and scipy code that releases the GIL.
        """
        runs = self._runs
        weights = [_contrast_weights(ds, name, spec, kind) for ds in runs]
        terms = [
            DesignTerms.build(ds["design"].values, order=ds.sizes.get("lag", 0)) for ds in runs
        ]
        dofs = [float(ds["dof"]) for ds in runs]

        def piece(voxels: slice) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
            per_run = [
                _run_effect(ds, t, w, voxels) for ds, t, w in zip(runs, terms, weights, strict=True)
            ]
            if len(per_run) > 1:
                effect, covariance, dof = con.fixed_effects(
                    [e for e, _ in per_run],
                    [c for _, c in per_run],
                    dofs,
                    precision_weighted=weighted,
                )
            else:
                (effect, covariance), dof = per_run[0], dofs[0]
            if kind == "t":
                return effect, covariance, con.t_test(effect[0], covariance[0, 0], dof)
            return effect, covariance, con.f_test(effect, covariance, dof)

        parts = over_voxel_slices(piece, runs[0].sizes["voxel"])
        effect = np.concatenate([p[0] for p in parts], axis=-1)
        covariance = np.concatenate([p[1] for p in parts], axis=-1)
        tested = {key: np.concatenate([p[2][key] for p in parts]) for key in ("stat", "p", "z")}
        dof = float(np.sum(dofs))
        return contrast_dataset(name, kind, effect, covariance, tested, dof, weights[0])

    # --- output ----------------------------------------------------------------
    def to_zarr(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the computed statistics to a Zarr store, atomically.

        One run is written at the store's root; several runs as groups ``run-0``,
        ``run-1``, ... The store is written to a temporary folder beside ``path`` and
        renamed into place when complete.

        Parameters
        ----------
        path : path-like
        overwrite : bool
            Replace an existing GLM result bigglm wrote. Anything else at ``path`` (a
            folder, a file, a run store) is refused, whatever ``overwrite`` says.

        Returns
        -------
        pathlib.Path

        Raises
        ------
        StoreError
            If ``path`` exists and is not a GLM result bigglm wrote, or is one and
            ``overwrite`` is False.

        Examples
        --------
        >>> import pandas as pd, bigglm, tempfile
        >>> ds = xr.Dataset({"bold": (("time", "voxel"), np.random.rand(8, 3))})
        >>> res = bigglm.fit(ds, pd.DataFrame({"c": np.ones(8)}))
        >>> out = res.to_zarr(Path(tempfile.mkdtemp()) / "fit.zarr")
        >>> GLMResult.from_zarr(out).beta.shape
        (1, 3)
        """
        return persistence.write_result_store(
            path, lambda: self.compute().runs, overwrite=overwrite
        )

    @classmethod
    def from_zarr(cls, path: str | os.PathLike[str]) -> GLMResult:
        """Load a result written by :meth:`to_zarr` (into memory).

        Parameters
        ----------
        path : path-like

        Returns
        -------
        GLMResult

        Raises
        ------
        StoreError
            If the store is missing or incomplete.

        Examples
        --------
        >>> import pandas as pd, bigglm, tempfile
        >>> ds = xr.Dataset({"bold": (("time", "voxel"), np.random.rand(8, 2))})
        >>> path = bigglm.fit(ds, pd.DataFrame({"c": np.ones(8)})).to_zarr(
        ...     Path(tempfile.mkdtemp()) / "fit.zarr")
        >>> GLMResult.from_zarr(path).runs[0].attrs["noise"]
        'ols'
        """
        return cls(persistence.read_result_store(path))

    def to_nifti(
        self,
        directory: str | os.PathLike[str],
        contrasts: con.ContrastSpec | Mapping[str, con.ContrastSpec],
        *,
        prefix: str | None = None,
        kind: ContrastKind = "t",
        precision_weighted: bool = False,
        overwrite: bool = False,
    ) -> list[Path]:
        """Write contrast maps as NIfTI files (GIFTI or CIFTI-2 for surface runs) with BIDS names.

        For each contrast, ``<prefix>_contrast-<label>_stat-<stat>_statmap.nii.gz`` for
        stat in effect, variance, t or F, p and z (for F, effect and variance are 4D: one
        volume per contrast row, the variance being that row's); ``<label>`` is the dict key
        (or the expression; for a weights dict the expression it stands for) in camelCase,
        by :func:`bigglm.glm.contrasts.label`, e.g. ``facesMinusHouses``. Names whose labels
        collide, and names holding ``/``, ``\\`` or ``..``, are refused before anything is
        written. Each file is
        written atomically by :func:`bigglm.to_nifti`, on the grid of the first run
        (the store the result was fitted from, also after :meth:`from_zarr`). A run
        converted from GIFTI gets one ``<prefix with hemi-L>_..._statmap.shape.gii`` per
        hemisphere (:func:`bigglm.to_gifti`; the ``hemi`` entity goes before ``space``),
        one from CIFTI-2 a ``..._statmap.dscalar.nii`` (:func:`bigglm.to_cifti`).

        Parameters
        ----------
        directory : path-like
        contrasts : as for :meth:`contrast`
        prefix : str, optional
            BIDS entities, e.g. ``"sub-01_task-faces"``. By default those of the bold
            files the runs' stores were converted from (their ``sources``, as
            :func:`bigglm.convert` records them), by :func:`bigglm.bids.map_prefix`:
            everything before ``_bold`` but ``desc``
            (``sub-01_ses-2_task-faces_run-1_bold.nii.gz`` gives
            ``sub-01_ses-2_task-faces_run-1``); for several runs fitted together, the
            entities all runs share, without ``run`` (``sub-01_ses-2_task-faces``).
        kind : {"t", "F"}
            Exactly ``"t"`` or ``"F"``; it names the statistic's files (``stat-t``,
            ``stat-F``).
        precision_weighted : bool
        overwrite : bool
            Replace maps bigglm wrote before; a file bigglm did not write is always
            refused.

        Returns
        -------
        list of pathlib.Path

        Raises
        ------
        TypeError
            If ``prefix`` is not given and a run's source is not a BIDS-named bold file
            (or the result does not record its sources: fitted from arrays in memory).
        DesignError
            As :meth:`contrast`, before any file is written.
        StoreError
            If the result has no voxel grid, or a map's path holds anything but an image
            bigglm wrote, or holds one and ``overwrite`` is False (checked for every map
            before any is written).

        Examples
        --------
        >>> import tempfile, nibabel as nib, pandas as pd, bigglm
        >>> tmp = Path(tempfile.mkdtemp())
        >>> y = np.random.default_rng(0).normal(100, 1, size=(2, 2, 1, 12)).astype("float32")
        >>> nib.save(nib.Nifti1Image(y, np.eye(4)), tmp / "bold.nii")
        >>> mask = np.ones((2, 2, 1), bool)
        >>> store = bigglm.convert(tmp / "bold.nii", tmp / "bold.zarr", mask=mask)
        >>> x = pd.DataFrame({"faces": np.tile([1.0, 0.0], 6), "houses": np.tile([0.0, 1.0], 6)})
        >>> files = bigglm.fit(store, x).to_nifti(tmp, "faces - houses", prefix="sub-01")
        >>> files[-1].name
        'sub-01_contrast-facesMinusHouses_stat-z_statmap.nii.gz'
        """
        like = self._like[0] if self._like else self.runs[0].attrs.get("store")
        if like is None:
            raise StoreError("this result has no voxel grid; fit from a store to write NIfTI")
        kind = con.check_kind(kind)
        if prefix is None:
            prefix = self._bids_prefix()

        def maps_of(spec: con.ContrastSpec) -> dict[str, xr.DataArray]:
            maps = self.contrast(spec, kind=kind, precision_weighted=precision_weighted)
            return contrast_maps(maps)

        return persistence.write_contrast_maps(
            directory, contrasts, maps_of, like=like, prefix=prefix, kind=kind, overwrite=overwrite
        )

    def _bids_prefix(self) -> str:
        """The BIDS entities of the runs' source files, for map names (:meth:`to_nifti`)."""
        from bigglm.bids import map_prefix

        sources = [[s.get("path", "") for s in ds.attrs.get("sources", [])] for ds in self.runs]
        prefix = map_prefix(sources)
        if prefix is None:
            names = ", ".join(Path(p).name for run in sources for p in run[:1]) or "none recorded"
            raise TypeError(
                f"to_nifti() needs prefix=...: the runs' sources ({names}) are not BIDS-named "
                "bold files (sub-<label>[_<key>-<label>...]_bold.nii[.gz]), so the maps' BIDS "
                "entities are unknown; pass e.g. prefix='sub-01_task-faces'"
            )
        return prefix

    # --- residuals -------------------------------------------------------------
    def residuals(self, run: int | None = None, *, whitened: bool = False) -> xr.DataArray:
        """The residuals of one run, ``(time, voxel)``: lazy, computed blockwise on request.

        The fit keeps no residuals (its one pass keeps sufficient statistics only). This
        fits first if the result is not computed yet, then returns a lazy array: reading
        it is a **second pass** over the run's data (re-read from its store, chunk by
        chunk, with the fitted betas), so ask for it only when residuals are needed.

        Parameters
        ----------
        run : int, optional
            Which run (0-based); may be left out for a single-run result.
        whitened : bool
            False (default): ``Y - X beta``, in the data's units, with the fit's betas
            (GLS betas for AR models). True: the whitened residuals ``W Y - W X beta``
            whose sum of squares is ``sigma2 * dof``, with bigglm's exact whitening
            (:mod:`bigglm.glm.ar`: each voxel's own AR coefficients, first p scans
            scaled by the Cholesky factor of their stationary covariance, i.e.
            Prais–Winsten for AR(1)). For OLS the two are the same.

        Returns
        -------
        xarray.DataArray
            float32 ``(time, voxel)`` backed by a dask array chunked as the run's
            ``bold``; NaN for voxels whose ``status`` is not ok. A task holds one chunk
            (whitening adds the p scans before it), so any run size can be computed or
            written (:meth:`write_residuals`) in bounded memory. When Dask's default
            scheduler is a ``distributed`` client, the betas are sent to its workers
            here, once, and the array is computed there.

        Raises
        ------
        DesignError
            If ``run`` is left out for several runs, or is out of range.
        StoreError
            If the run's data cannot be found (a result loaded with :meth:`from_zarr`
            re-opens the store it was fitted from) or no longer match the fit.

        Notes
        -----
        nilearn (``FirstLevelModel(minimize_memory=False).residuals``) returns ``Y - X
        beta`` for OLS, the same numbers as bigglm (on data not rescaled:
        ``signal_scaling=False``). For AR models nilearn 0.14 returns ``Y - (W X) beta``,
        raw data minus the *whitened* design's prediction, which is neither raw nor
        whitened residuals (nilearn issue #2964, open; the maintainers named ``Y - X
        beta`` as the intended one). bigglm does not copy that: its default is the
        intended ``Y - X beta`` for every noise model, and ``whitened=True`` gives the
        whitened residuals. These also differ from nilearn's by its AR choices (0.01
        bins, unscaled first scan; see :mod:`bigglm.glm.ar`).

        Examples
        --------
        >>> import pandas as pd, bigglm
        >>> x = pd.DataFrame({"a": np.tile([1.0, 0.0], 6), "constant": 1.0})
        >>> y = np.random.default_rng(0).normal(size=(12, 3)).astype("float32")
        >>> res = bigglm.fit(xr.Dataset({"bold": (("time", "voxel"), y)}), x, noise="ar1")
        >>> e = res.residuals()
        >>> e.dims, e.dtype
        (('time', 'voxel'), dtype('float32'))
        >>> expected = y - x.to_numpy() @ res.beta.values
        >>> bool(np.allclose(e.values, expected, atol=1e-6))
        True
        >>> w = res.residuals(whitened=True).values.astype(float)
        >>> bool(np.allclose((w**2).sum(axis=0), res.sigma2.values * float(res.dof)))
        True
        """
        from bigglm.glm.residuals import run_residuals

        index = self._run_index(run)
        fitted = self.compute().runs[index]
        source = self._source(index)
        logger.info("residuals of run %d: a second pass over its data when computed", index)
        return run_residuals(source, fitted, whitened=whitened)

    def write_residuals(
        self,
        directory: str | os.PathLike[str],
        prefix: str | Sequence[str],
        *,
        whitened: bool = False,
        format: ResidualFormat = "nifti",
        overwrite: bool = False,
        client: Client | None = None,
    ) -> list[Path]:
        """Write each run's residuals (:meth:`residuals`), streamed and atomically.

        One file per run, named ``<prefix>_desc-residuals_bold.nii.gz`` (whitened:
        ``desc-whitenedResiduals``), or ``.zarr`` for ``format="zarr"``. This is a second
        pass over the data. A NIfTI is assembled one row of chunks at a time (this
        process holds one time chunk of volumes by all voxels, never the series; the
        workers compute the row in groups of chunks) and written under a temporary
        name, then renamed. A Zarr store has the layout of a converted
        run (:func:`bigglm.open_run` opens it, :func:`bigglm.to_nifti` writes it out)
        and the chunks of the input; workers write its chunks directly.

        Parameters
        ----------
        directory : path-like
            Created if missing.
        prefix : str or sequence of str
            BIDS entities per run, e.g. ``"sub-01_task-faces_run-1"``; one per run (a
            single string for a single-run result).
        whitened : bool
            As for :meth:`residuals`.
        format : {"nifti", "zarr"}
        overwrite : bool
            Replace existing outputs bigglm wrote (otherwise an existing output is an
            error; anything bigglm did not write is always refused).
        client : distributed.Client, optional
            Where to compute: default, the result's client, else Dask's default.

        Returns
        -------
        list of pathlib.Path
            One per run.

        Raises
        ------
        DesignError
            If the number of prefixes is not the number of runs.
        StoreError
            If an output exists and ``overwrite`` is False, or a run's data cannot be
            found or have no voxel grid (fitted from a Dataset without a mask).

        Examples
        --------
        >>> import tempfile, nibabel as nib, pandas as pd, bigglm
        >>> tmp = Path(tempfile.mkdtemp())
        >>> y = np.random.default_rng(0).normal(100, 1, size=(2, 2, 1, 12)).astype("float32")
        >>> nib.save(nib.Nifti1Image(y, np.eye(4)), tmp / "bold.nii")
        >>> mask = np.ones((2, 2, 1), bool)
        >>> store = bigglm.convert(tmp / "bold.nii", tmp / "bold.zarr", mask=mask)
        >>> x = pd.DataFrame({"a": np.tile([1.0, 0.0], 6), "constant": 1.0})
        >>> (path,) = bigglm.fit(store, x).write_residuals(tmp, "sub-01_task-a")
        >>> path.name, nib.load(path).shape
        ('sub-01_task-a_desc-residuals_bold.nii.gz', (2, 2, 1, 12))
        """
        n_runs = len(self._runs)
        paths = persistence.residual_paths(
            directory, prefix, n_runs, whitened=whitened, format=format, overwrite=overwrite
        )
        sources = [self._source(index) for index in range(n_runs)]
        persistence.check_voxel_grids(sources)  # every run checked before any is written
        with on_scheduler(client if client is not None else self._client):
            for index, (path, like) in enumerate(zip(paths, sources, strict=True)):
                values = self.residuals(index, whitened=whitened)
                logger.info("writing %s (a second pass over run %d)", path, index)
                persistence.write_residual(values, like, path, format=format, overwrite=overwrite)
        return paths

    def _run_index(self, run: int | None) -> int:
        """A valid 0-based run index (``None`` only for a single-run result)."""
        n_runs = len(self._runs)
        if run is None:
            if n_runs > 1:
                raise DesignError(
                    f"this result has {n_runs} runs; pass run=0..{n_runs - 1} to choose one"
                )
            return 0
        if not -n_runs <= run < n_runs:
            raise DesignError(f"run={run} is out of range for a result of {n_runs} run(s)")
        return run % n_runs

    def _source(self, index: int) -> xr.Dataset:
        """The data run ``index`` was fitted from: as given to :func:`fit`, or its store."""
        from bigglm.glm.residuals import open_source

        given = self._like[index] if self._like else None
        if given is None:
            given = self.runs[index].attrs.get("store")
        if given is None:
            raise StoreError(
                f"run {index} of this result does not say where its data are (no 'store' "
                "attribute); fit from a store, or fit again from the data"
            )
        return open_source(given)


def contrast_maps(maps: xr.Dataset) -> dict[str, xr.DataArray]:
    """The (voxel,) or (row, voxel) maps of a contrast Dataset that are written as images.

    Keys ``effect``, ``variance``, ``stat``, ``p`` and ``z``. For an F contrast the effect
    and the variance have one row per contrast row (4D images), the variance being the
    diagonal of the effect's covariance.

    Examples
    --------
    >>> maps = xr.Dataset({"effect": (("row", "voxel"), np.ones((2, 3))),
    ...                    "variance": (("row", "row2", "voxel"), np.ones((2, 2, 3)))})
    >>> contrast_maps(maps)["variance"].dims
    ('row', 'voxel')
    """
    out = {"effect": maps["effect"], "variance": maps["variance"]}
    if "row2" in maps["variance"].dims:
        diagonal = np.einsum("iiv->iv", maps["variance"].values)
        out["variance"] = xr.DataArray(diagonal, dims=("row", "voxel"))
    out.update({name: maps[name] for name in ("stat", "p", "z") if name in maps})
    return out


def _contrast_weights(
    ds: xr.Dataset, name: str, spec: con.ContrastSpec, kind: ContrastKind
) -> np.ndarray:
    """The (q, P) contrast matrix for a run's design, checked to be estimable."""
    columns = [str(c) for c in ds["regressor"].values]
    return con.estimable_contrast(spec, ds["design"].values, columns, kind=kind, name=name)


def _run_effect(
    ds: xr.Dataset, terms: DesignTerms, weights: np.ndarray, voxels: slice
) -> tuple[np.ndarray, np.ndarray]:
    """Effect (q, v) and covariance (q, q, v) of one run's voxels."""
    beta, sigma2 = ds["beta"].values[:, voxels], ds["sigma2"].values[voxels]
    if "film_covariance" in ds:  # FILM: each voxel's own whitened design
        cov = ds["film_covariance"].values[:, :, voxels]
        unscaled = np.einsum("qp,prv,sr->qsv", weights, cov, weights)
        return con.effect_and_covariance(weights, beta, sigma2, unscaled)
    if "ar" not in ds:
        unscaled = weights @ terms.gram_pinv @ weights.T
        return con.effect_and_covariance(weights, beta, sigma2, unscaled)
    phi = ds["ar"].values[:, voxels]
    step = voxels_per_batch(weights.shape[1])
    parts = []
    for lo in range(0, beta.shape[1], step):
        sl = slice(lo, lo + step)
        unscaled = ar_contrast_variance(terms, phi[:, sl], weights)
        parts.append(con.effect_and_covariance(weights, beta[:, sl], sigma2[sl], unscaled))
    return np.concatenate([p[0] for p in parts], axis=-1), np.concatenate(
        [p[1] for p in parts], axis=-1
    )


def contrast_dataset(
    name: str,
    kind: ContrastKind,
    effect: np.ndarray,
    covariance: np.ndarray,
    tested: dict[str, np.ndarray],
    dof: float | np.ndarray,
    weights: np.ndarray,
) -> xr.Dataset:
    """Package a contrast's numbers with their statistics (the Dataset ``contrast`` returns).

    ``dof`` is one number (first level) or one per voxel (group level).

    Examples
    --------
    >>> out = contrast_dataset("a", "t", np.ones((1, 2)), np.ones((1, 1, 2)),
    ...                        {k: np.zeros(2) for k in ("stat", "p", "z")}, 10.0, np.eye(1))
    >>> sorted(out.data_vars), out.attrs["name"]
    (['dof', 'effect', 'p', 'stat', 'variance', 'z'], 'a')
    """
    if kind == "t":
        data: dict[str, Any] = {
            "effect": ("voxel", effect[0]),
            "variance": ("voxel", covariance[0, 0]),
        }
    else:
        data = {
            "effect": (("row", "voxel"), effect),
            "variance": (("row", "row2", "voxel"), covariance),
        }
    data.update(stat=("voxel", tested["stat"]), p=("voxel", tested["p"]), z=("voxel", tested["z"]))
    data["dof"] = ("voxel", dof) if np.ndim(dof) else ((), dof)
    coords = {"row": np.arange(effect.shape[0]), "row2": np.arange(effect.shape[0])}
    attrs = {"name": name, "kind": kind, "weights": weights.tolist()}
    return xr.Dataset(data, coords=coords if kind == "F" else None, attrs=attrs)
