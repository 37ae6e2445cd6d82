"""The HRFs of bigglm's teaching texts, as functions of time and as ``hrf=`` models.

* :func:`seed_gamma_hrf` is the SPM-like HRF of the correlated-regressors text: a
  gamma density of shape 6 minus 0.35 times one of shape 12 (scale 1 s), zero at and
  before 0, sampled at the given times and scaled to unit sum.
* :func:`seed_power_hrf` is ``t**8.6 * exp(-t / 0.547)`` from the convolution text.

``SEED_GAMMA`` and ``SEED_POWER`` wrap them for ``make_design(..., hrf=...)``; the
columns are named ``<condition>_seed_gamma`` and ``<condition>_seed_power``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import gamma

from bigglm.design.hemodynamic import from_time_function

__all__ = ["SEED_GAMMA", "SEED_POWER", "seed_gamma_hrf", "seed_power_hrf"]


def seed_gamma_hrf(times: ArrayLike) -> NDArray[np.float64]:
    """SPM-like HRF of the correlated-regressors text, scaled to unit sum.

    Parameters
    ----------
    times : array_like
        Times (s) after the event.

    Returns
    -------
    numpy.ndarray
        ``gamma.pdf(t, 6) - 0.35 * gamma.pdf(t, 12)`` for ``t > 0`` (0 elsewhere),
        divided by its sum over ``times``.

    Examples
    --------
    >>> import numpy as np
    >>> seed_gamma_hrf(np.arange(0, 30, 2)).round(3)[:5]
    array([0.   , 0.111, 0.479, 0.47 , 0.204])
    """
    t = np.asarray(times, dtype=np.float64)
    values = np.zeros(t.shape)
    after = t > 0
    values[after] = gamma.pdf(t[after], 6) - 0.35 * gamma.pdf(t[after], 12)
    return values / values.sum()


def seed_power_hrf(times: ArrayLike) -> NDArray[np.float64]:
    """The convolution text's HRF, ``t**8.6 * exp(-t / 0.547)`` (not normalised).

    Parameters
    ----------
    times : array_like
        Times (s) after the event, >= 0.

    Returns
    -------
    numpy.ndarray

    Examples
    --------
    >>> seed_power_hrf([0.0, 4.7]).round(2)
    array([  0. , 111.8])
    """
    t = np.asarray(times, dtype=np.float64)
    return np.asarray(t**8.6 * np.exp(-t / 0.547), dtype=np.float64)


#: ``hrf=`` model of :func:`seed_gamma_hrf` (32 s kernel, unit sum).
SEED_GAMMA = from_time_function(seed_gamma_hrf, name="seed_gamma")
#: ``hrf=`` model of :func:`seed_power_hrf` (20 s kernel, scaled to unit sum).
SEED_POWER = from_time_function(seed_power_hrf, time_length=20.0, name="seed_power")
