"""Low-frequency drift regressors: a discrete cosine basis, polynomials, or a constant.

Names and values follow nilearn: drift columns are ``drift_1 .. drift_K`` followed by
``constant`` (a column of ones), for every drift model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from bigglm.design._warnings import warn_caller
from bigglm.design.orthogonal import orthogonalize_in_order
from bigglm.exceptions import DesignError

__all__ = ["cosine_drift", "drift_regressors", "polynomial_drift"]


def cosine_drift(frame_times: NDArray[np.float64], high_pass: float) -> NDArray[np.float64]:
    """DCT-II cosines of period longer than ``1 / high_pass``, then a constant column.

    Parameters
    ----------
    frame_times : numpy.ndarray
        Acquisition times (s), at least two.
    high_pass : float
        Cut-off frequency (Hz). There are ``floor(2 n high_pass dt)`` cosines (at most
        ``n - 1``), ``dt`` the mean frame interval, each of unit norm
        (``sqrt(2/n) cos(pi k (i + 1/2) / n)``).

    Returns
    -------
    numpy.ndarray
        Shape ``(n, n_cosines + 1)``; the last column is ones.

    Examples
    --------
    >>> cosine_drift(np.arange(4) * 2.0, high_pass=0.1).round(3)
    array([[ 0.653,  1.   ],
           [ 0.271,  1.   ],
           [-0.271,  1.   ],
           [-0.653,  1.   ]])
    """
    n = len(frame_times)
    dt = (frame_times[-1] - frame_times[0]) / (n - 1)
    if high_pass * dt >= 0.5:
        warn_caller(
            f"high_pass={high_pass} Hz is at or above the Nyquist frequency "
            f"({0.5 / dt:g} Hz): the cosine drift spans every frequency and saturates "
            "the design; lower high_pass"
        )
    order = int(min(n - 1, np.floor(2 * n * high_pass * dt)))  # no overflow at 1e308 Hz
    k = np.arange(1, order + 1)[None, :]
    i = np.arange(n)[:, None]
    cosines = np.sqrt(2.0 / n) * np.cos((np.pi / n) * (i + 0.5) * k)
    return np.hstack([cosines, np.ones((n, 1))])


def polynomial_drift(frame_times: NDArray[np.float64], order: int) -> NDArray[np.float64]:
    """Polynomials of ``t / max(t)`` up to ``order``, orthogonalised, then a constant.

    Parameters
    ----------
    frame_times : numpy.ndarray
        Acquisition times (s).
    order : int
        Highest power.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, order + 1)``: powers 1..order, each orthogonal to the lower ones
        (constant included), then the column of ones.

    Examples
    --------
    >>> polynomial_drift(np.arange(3) * 2.0, 1).round(6) + 0.0
    array([[-0.5,  1. ],
           [ 0. ,  1. ],
           [ 0.5,  1. ]])
    """
    scaled = np.asarray(frame_times, dtype=np.float64) / float(np.max(frame_times))
    powers = scaled[:, None] ** np.arange(int(order) + 1)[None, :]
    basis = orthogonalize_in_order(powers)
    return np.hstack([basis[:, 1:], basis[:, :1]])


def drift_regressors(
    frame_times: NDArray[np.float64],
    model: str | None = "cosine",
    *,
    high_pass: float = 0.01,
    order: int = 1,
) -> pd.DataFrame:
    """The drift block of a design: ``drift_1 .. drift_K`` then ``constant``.

    Parameters
    ----------
    frame_times : numpy.ndarray
        Acquisition times (s).
    model : {"cosine", "polynomial", None}, default="cosine"
        Drift model; None gives the constant only.
    high_pass : float, default=0.01
        Cut-off (Hz) of the cosine model.
    order : int, default=1
        Order of the polynomial model.

    Returns
    -------
    pandas.DataFrame
        Indexed by frame time.

    Raises
    ------
    DesignError
        For an unknown model.

    Examples
    --------
    >>> list(drift_regressors(np.arange(100) * 2.0, "cosine", high_pass=0.01).columns)
    ['drift_1', 'drift_2', 'drift_3', 'drift_4', 'constant']
    """
    key = model.lower() if isinstance(model, str) else model
    if key == "cosine":
        values = cosine_drift(frame_times, high_pass)
    elif key == "polynomial":
        values = polynomial_drift(frame_times, order)
    elif key is None:
        values = np.ones((len(frame_times), 1))
    else:
        raise DesignError(f"unknown drift model {model!r}; use 'cosine', 'polynomial' or None")
    names = [f"drift_{k}" for k in range(1, values.shape[1])] + ["constant"]
    return pd.DataFrame(values, columns=names, index=frame_times)
