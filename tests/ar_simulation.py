"""The AR(p) test data of the brute-force and residuals tests, and what they share.

* :func:`simulate` is a 4-column design (two block conditions, a cosine drift, the
  constant) and AR(p) noise around a large mean, from one seeded generator.
* :func:`as_run` wraps the data as an in-memory Dataset shaped like
  :func:`bigglm.open_run`'s output.
* :func:`yule_walker` is the plain-numpy AR estimate the references whiten with.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.signal
import xarray as xr

__all__ = ["as_run", "simulate", "yule_walker"]


def simulate(
    n_scans: int = 96,
    n_vox: int = 24,
    phi: tuple[float, ...] = (0.4,),
    mean: float = 1000.0,
    sd: float = 1.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, np.ndarray]:
    """A 4-column design (two conditions, a drift, the constant) and AR(p) data.

    Parameters
    ----------
    n_scans, n_vox : int
        Data shape ``(n_scans, n_vox)``.
    phi : tuple of float
        AR coefficients of the noise.
    mean : float
        Added to every sample.
    sd : float
        Scale of the AR noise (its innovations are standard normal).
    seed : int
        Seed of ``numpy.random.default_rng``: betas drawn first, then innovations.

    Returns
    -------
    design : pandas.DataFrame
    y : numpy.ndarray, float32
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n_scans)
    design = pd.DataFrame(
        {
            "faces": (t // 8 % 2 == 0).astype(float),
            "houses": (t // 12 % 2 == 0).astype(float),
            "drift": np.cos(np.pi * (t + 0.5) / n_scans),
            "constant": 1.0,
        }
    )
    beta = rng.normal(size=(4, n_vox)) * [[2.0], [1.0], [3.0], [0.0]]
    noise = scipy.signal.lfilter(
        [1.0], np.r_[1.0, -np.array(phi)], rng.normal(size=(n_scans, n_vox)), axis=0
    )
    y = mean + design.to_numpy() @ beta + sd * noise
    return design, y.astype(np.float32)


def as_run(y: np.ndarray, chunks: tuple[int, int] = (32, 10)) -> xr.Dataset:
    """An in-memory Dataset shaped like bigglm.open_run's output."""
    return xr.Dataset({"bold": (("time", "voxel"), y)}).chunk(
        {"time": chunks[0], "voxel": chunks[1]}
    )


def yule_walker(e: np.ndarray, order: int) -> np.ndarray:
    """Yule–Walker with 1/(T-k) autocovariances, as nilearn and statsmodels ('adjusted')."""
    n = len(e)
    r = np.array([e[k:] @ e[: n - k] / (n - k) for k in range(order + 1)])
    return np.linalg.solve(scipy.linalg.toeplitz(r[:order]), r[1:])
