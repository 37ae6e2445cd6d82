"""FSL FILM's prewhitening (``noise="film"``): each voxel whitened by its own autocorrelation.

What FILM (``film_gls``, FSL 5.0.9) does, and what this module reproduces (checked against
a real FEAT first level, ``tests/test_film.py``):

* **Data and design** (exact). The data are demeaned per voxel and the design's
  non-constant columns are demeaned; FILM fits no constant. bigglm keeps a design's
  constant column out of the whitened fit and reports the voxel mean as its estimate
  (its variance is the white-noise one, ``sigma2 / n``: an approximation, since FILM
  has no such number).
* **Autocorrelation estimate** (approximate). The OLS residuals' autocorrelation per
  voxel, ``sum_t r_t r_{t+k} / sum_t r_t^2`` for lags ``k = 0 .. M - 1``, tapered by
  FILM's Tukey window ``0.5 (1 + cos(pi (k + 1) / M))`` (FILM's own ``threshac1`` has this
  1-based taper: its lag 0 is ``0.933`` for ``M = 6``), ``M = int(sqrt(n))`` by default.
  FILM then smooths the raw estimates in space with SUSAN (``--sa --ms=5``), which needs
  each voxel's neighbours. By default bigglm does not smooth (each voxel block stays
  independent, one pass), so its estimate is noisier than FILM's. ``film_smoothing=
  (sigma_mm, brightness)`` smooths approximately (:func:`susan_smooth`: SUSAN's weights on
  the data's mean image, centre included, no median fallback) after a first pass that
  collects every voxel's raw estimate (``m`` numbers per voxel, in memory); FILM's rule
  for the brightness threshold is not known here and must be given. On the real FEAT run,
  sigma 5 mm (its ``--ms``) and a threshold of 2600 give ``threshac1`` to 0.011 and z to
  1.2% of the peak; without smoothing the gap is 0.31 and up to 42%.
* **Whitening** (exact, given the autocorrelation). Zero padding to the next power of two
  at or above ``n``, the autocorrelation laid out symmetrically (lags ``0 .. M - 1`` at
  the start, ``M - 1 .. 1`` at the end), its FFT's real part ``S``; data and each design
  column are filtered by ``1 / sqrt(S)`` in the frequency domain and cut back to ``n``
  points (not demeaned again).
* **Fit** (exact). OLS of the whitened data on the voxel's whitened design (its own
  pseudo-inverse), ``sigma2 = RSS / (n - p)``, t with ``n - p`` degrees of freedom and z
  from the t distribution, ``p`` the non-constant columns.

Not applied: FILM's ``--thr`` (voxels whose mean is below it are left unfitted; here the
store's mask decides) and its ``sigmasquareds`` normalisation.

Given FILM's ``threshac1`` (``film_autocorrelation=``), ``pe``, ``tstat`` and ``zstat``
equal FILM's to 1e-5 of each map's peak. FILM needs all time points of a voxel at once:
the fit reads the store a second time in voxel blocks that hold whole series (a dask
rechunk), each block bounded in memory (:data:`BLOCK_BYTES`), independent of the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bigglm.exceptions import DesignError

__all__ = [
    "BLOCK_BYTES",
    "film_autocorrelation",
    "film_block",
    "film_dof",
    "film_padding",
    "film_raw_block",
    "film_voxels_per_block",
    "given_autocorrelation",
    "susan_smooth",
    "tukey_taper",
]

Array = NDArray[np.float64]

#: Working memory of one voxel block's whitening (the complex spectra of its designs).
BLOCK_BYTES = 64 * 2**20


def film_padding(n_scans: int) -> int:
    """FILM's FFT length: the next power of two at or above ``n_scans`` (64 for 45)."""
    return int(2 ** np.ceil(np.log2(n_scans)))


def tukey_taper(m: int) -> Array:
    """FILM's Tukey weights for lags ``0 .. m - 1``: ``0.5 (1 + cos(pi (k + 1) / m))``."""
    return 0.5 * (1 + np.cos(np.pi * np.arange(1, m + 1) / m))


def film_autocorrelation(residuals: Array, m: int) -> Array:
    """The tapered autocorrelation, lags ``0 .. m - 1``, of ``(time, voxel)`` residuals.

    Parameters
    ----------
    residuals : numpy.ndarray, shape (n, v)
    m : int
        Tukey window (FILM's ``--tukey``; ``int(sqrt(n))`` by default).

    Returns
    -------
    numpy.ndarray, shape (m, v)

    Examples
    --------
    >>> r = np.random.default_rng(0).standard_normal((100, 2))
    >>> film_autocorrelation(r, 10)[0].round(3)  # lag 0 carries the taper's first weight
    array([0.976, 0.976])
    """
    return np.asarray(_raw_autocorrelation(residuals, m) * tukey_taper(m)[:, None], np.float64)


def _raw_autocorrelation(residuals: Array, m: int) -> Array:
    """``sum_t r_t r_{t+k} / sum_t r_t^2`` for lags ``0 .. m - 1``, untapered."""
    n = residuals.shape[0]
    sums = np.array([(residuals[: n - k] * residuals[k:]).sum(0) for k in range(m)])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(sums / sums[0], dtype=np.float64)


def _spectrum(ac: Array, n_pad: int) -> Array:
    """Real part of the FFT of each voxel's symmetric autocorrelation, ``(n_pad, v)``."""
    m = ac.shape[0]
    if m > n_pad // 2:
        raise DesignError(
            f"the autocorrelation has {m} lags; FILM's padding of {n_pad} holds <= {n_pad // 2}"
        )
    vec = np.zeros((n_pad, ac.shape[1]))
    vec[:m] = ac
    vec[n_pad - m + 1 :] = ac[1:][::-1]
    return np.real(np.fft.fft(vec, axis=0))


def film_voxels_per_block(n_scans: int, n_regressors: int) -> int:
    """Voxels whose whitening fits in :data:`BLOCK_BYTES` (at least 1)."""
    per_voxel = film_padding(n_scans) * (n_regressors + 1) * 16 * 3
    return max(1, BLOCK_BYTES // per_voxel)


def film_block(
    bold: Array,
    design: Array,
    autocorrelation: Array | None = None,
    *,
    tukey: int | None = None,
) -> dict[str, Array]:
    """FILM's fit of one voxel block with whole time series (see the module text).

    Parameters
    ----------
    bold : numpy.ndarray, shape (n, v)
    design : numpy.ndarray, shape (n, P)
        May hold constant columns (kept out of the whitened fit).
    autocorrelation : numpy.ndarray, shape (m, v), optional
        Given autocorrelations (e.g. FILM's ``threshac1``); estimated if omitted.
    tukey : int, optional
        The Tukey window ``M`` of the estimate, ``int(sqrt(n))`` by default.

    Returns
    -------
    dict
        ``beta`` (P, v), ``sigma2`` (v,), ``status`` (v,), ``film_covariance``
        (P, P, v): the unscaled covariance ``(X~'X~)^+`` of each voxel, and
        ``film_autocorrelation`` (m, v).

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> X = np.column_stack([np.tile([0.0, 1.0], 32), np.ones(64)])
    >>> out = film_block(10 + X[:, :1] * 2 + rng.standard_normal((64, 3)), X)
    >>> out["beta"].shape, out["film_covariance"].shape, out["film_autocorrelation"].shape
    ((2, 3), (2, 2, 3), (8, 3))
    """
    y = np.asarray(bold, dtype=np.float64)
    X = np.asarray(design, dtype=np.float64)
    n, n_vox = y.shape
    constant = np.ptp(X, axis=0) == 0
    free = ~constant
    Xd = X[:, free] - X[:, free].mean(0)
    mean = y.mean(0)
    yd = y - mean
    if autocorrelation is None:
        m = int(np.sqrt(n)) if tukey is None else int(tukey)
        residuals = yd - Xd @ (np.linalg.pinv(Xd) @ yd)
        ac = film_autocorrelation(residuals, m)
    else:
        ac = np.asarray(autocorrelation, dtype=np.float64)
    full_rank = np.linalg.matrix_rank(Xd) == Xd.shape[1]
    step = film_voxels_per_block(n, X.shape[1])
    parts = [
        _whitened_fit(yd[:, lo : lo + step], Xd, ac[:, lo : lo + step], full_rank)
        for lo in range(0, n_vox, step)
    ]
    coef = np.concatenate([c for c, _, _, _ in parts], axis=1)
    ginv = np.concatenate([g for _, g, _, _ in parts], axis=0)
    sigma2 = np.concatenate([s for _, _, s, _ in parts])
    bad = np.concatenate([b for _, _, _, b in parts]) | ~np.all(np.isfinite(y), axis=0)
    beta = np.zeros((X.shape[1], n_vox))
    beta[free] = coef
    covariance = np.zeros((X.shape[1], X.shape[1], n_vox))
    covariance[np.ix_(free, free)] = np.moveaxis(ginv, 0, -1)
    for j in np.flatnonzero(constant):
        scale = X[0, j]
        beta[j] = mean / scale if scale else 0.0
        covariance[j, j] = 1.0 / (n * scale * scale) if scale else 0.0
    status = np.where(bad, 3, np.where(np.ptp(y, axis=0) == 0, 1, 0)).astype(np.int8)
    beta[:, status != 0] = np.nan
    sigma2[status != 0] = np.nan
    return {
        "beta": beta,
        "sigma2": sigma2,
        "status": status,
        "film_covariance": covariance,
        "film_autocorrelation": ac,
    }


def _whitened_fit(
    yd: Array, Xd: Array, ac: Array, full_rank: bool
) -> tuple[Array, Array, Array, NDArray[np.bool_]]:
    """Whiten a slab of voxels and fit each: ``coef`` (p, v), ``(X~'X~)^+`` (v, p, p),
    ``sigma2`` (v,) and the voxels whose spectrum is not positive.

    The spectrum of a symmetric autocorrelation is real and even, so real FFTs carry it;
    the design is whitened voxel-major ``(v, p, n)`` so that each transform runs along
    contiguous memory, and the grams are batched products. With a design of full column
    rank every gram is positive definite and is inverted directly (the whitening filter
    is invertible); otherwise by pseudo-inverse, as FILM's own fit does."""
    n, p = Xd.shape
    n_pad = film_padding(n)
    spectrum = _spectrum(ac, n_pad)[: n_pad // 2 + 1]  # (half, v)
    bad = ~np.all(spectrum > 0, axis=0)
    gain = 1.0 / np.sqrt(np.where(spectrum > 0, spectrum, 1.0))  # bad voxels: any gain
    yw = np.fft.irfft(np.fft.rfft(yd, n_pad, axis=0) * gain, n_pad, axis=0)[:n].T  # (v, n)
    fx = np.fft.rfft(Xd.T, n_pad, axis=1)  # (p, half)
    xw = np.fft.irfft(fx[None, :, :] * gain.T[:, None, :], n_pad, axis=2)[:, :, :n]
    gram = np.matmul(xw, xw.transpose(0, 2, 1))  # (v, p, p)
    ginv = np.linalg.inv(gram) if full_rank else np.linalg.pinv(gram)
    coef = np.matmul(ginv, np.matmul(xw, yw[:, :, None]))  # (v, p, 1)
    resid = yw - np.matmul(xw.transpose(0, 2, 1), coef)[:, :, 0]
    sigma2 = np.einsum("vt,vt->v", resid, resid) / (n - p)
    return coef[:, :, 0].T, ginv, sigma2, bad


def film_raw_block(bold: Array, design: Array, m: int) -> dict[str, Array]:
    """First pass of a smoothed estimate: each voxel's untapered residual autocorrelation
    (lags ``0 .. m - 1``) and its temporal mean (the brightness image of the smoothing)."""
    y = np.asarray(bold, dtype=np.float64)
    X = np.asarray(design, dtype=np.float64)
    free = np.ptp(X, axis=0) != 0
    Xd = X[:, free] - X[:, free].mean(0)
    yd = y - y.mean(0)
    residuals = yd - Xd @ (np.linalg.pinv(Xd) @ yd)
    return {"raw": _raw_autocorrelation(residuals, m), "mean": y.mean(0)}


def susan_smooth(
    values: Array,
    ijk: NDArray[np.int64],
    voxel_size: Array,
    brightness_image: Array,
    sigma: float,
    brightness: float,
) -> Array:
    """SUSAN-like smoothing of per-voxel values ``(m, v)`` within the mask (approximate).

    Each voxel becomes the weighted mean of the mask voxels within ``3 sigma`` (mm),
    itself included, weights ``exp(-d^2 / (2 sigma^2)) exp(-(dI / brightness)^2)``,
    ``dI`` the difference of ``brightness_image`` (the data's temporal mean) between the
    two voxels. This is the form of FSL's SUSAN with the mean image as its USAN; SUSAN's
    median fallback and FILM's rule for the brightness threshold are not reproduced.
    Memory: ``m`` values per voxel of the bounding box of the mask.

    Examples
    --------
    >>> ijk = np.array([[0, 0, 0], [1, 0, 0], [5, 0, 0]])
    >>> susan_smooth(np.array([[0.0, 1.0, 5.0]]), ijk, np.ones(3), np.zeros(3), 1.0, 1.0).round(2)
    array([[0.38, 0.62, 5.  ]])
    """
    lo = ijk.min(0)
    idx = ijk - lo
    shape = tuple(int(s) for s in idx.max(0) + 1)
    radius = np.ceil(3 * sigma / np.asarray(voxel_size, dtype=np.float64)).astype(int)
    inside = np.zeros(shape, dtype=bool)
    inside[tuple(idx.T)] = True
    grid = np.zeros((values.shape[0], *shape))
    grid[(slice(None), *idx.T)] = values
    image = np.zeros(shape)
    image[tuple(idx.T)] = brightness_image
    total = np.zeros((values.shape[0], idx.shape[0]))
    weight = np.zeros(idx.shape[0])
    ranges = [range(-int(r), int(r) + 1) for r in radius]
    for offset in np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).T:
        d2 = float(((offset * voxel_size) ** 2).sum())
        if d2 > (3 * sigma) ** 2:
            continue
        other = idx + offset
        ok = np.all((other >= 0) & (other < shape), axis=1)
        ok[ok] = inside[tuple(other[ok].T)]
        where = tuple(other[ok].T)
        w = np.exp(-d2 / (2 * sigma * sigma)) * np.exp(
            -(((image[where] - brightness_image[ok]) / brightness) ** 2)
        )
        total[:, ok] += w * grid[(slice(None), *where)]
        weight[ok] += w
    return np.asarray(total / weight, dtype=np.float64)


def film_dof(design: Array) -> float:
    """FILM's degrees of freedom: scans minus the design's non-constant columns."""
    X = np.asarray(design)
    return float(X.shape[0] - int(np.sum(np.ptp(X, axis=0) != 0)))


def given_autocorrelation(value: Any, coords: Mapping[str, Any], n_vox: int) -> Array:
    """A given autocorrelation as ``(lag, voxel)``: an array, or a NIfTI like ``threshac1``
    (x, y, z, lag) read at the run's voxel coordinates ``i, j, k``."""
    if isinstance(value, np.ndarray) and value.ndim == 2:
        ac = value if value.shape[1] == n_vox else value.T
        if ac.shape[1] != n_vox:
            raise DesignError(
                f"film_autocorrelation has shape {value.shape}; expected (lags, {n_vox}) "
                f"or ({n_vox}, lags) for this run's voxels"
            )
        return np.asarray(ac, dtype=np.float64)
    if isinstance(value, np.ndarray):
        image = np.asarray(value, dtype=np.float64)
    else:
        import nibabel as nib

        loaded: Any = nib.load(value)
        image = np.asarray(loaded.dataobj, dtype=np.float64)
    if image.ndim != 4 or not all(c in coords for c in ("i", "j", "k")):
        raise DesignError(
            f"film_autocorrelation: expected a (lag, voxel) array or a 4D (x, y, z, lag) "
            f"image such as FILM's threshac1 for a run with voxel coordinates i, j, k; got "
            f"shape {image.shape}"
        )
    i, j, k = (np.asarray(coords[c], dtype=np.int64) for c in ("i", "j", "k"))
    return np.ascontiguousarray(image[i, j, k].T)
