"""Haemodynamic response kernels and the convolution that applies them.

The named models (``"spm"``, ``"glover"``, their time and dispersion derivatives, and
``"fir"``) are sampled exactly as nilearn's ``make_first_level_design_matrix`` samples
them, so that bigglm and nilearn give the same design columns:

* the kernel lives on the oversampled grid of step ``dt = tr / oversampling``;
* it is evaluated at ``round(time_length / dt)`` points spread evenly over
  ``[0, time_length]`` (so the effective spacing is ``time_length / (n - 1)``, a hair
  more than ``dt``; nilearn does the same and we keep it for identical columns);
* each gamma density starts one step ``dt`` after the event (``loc = dt``) and the
  kernel is scaled to unit sum, so a long block of amplitude 1 plateaus at 1.

A user model is a callable ``f(tr, oversampling) -> 1-D array`` (nilearn's
convention) sampled on that grid; :func:`from_time_function` turns a plain function of
time in seconds (as in the teaching texts) into one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import cast, get_args

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bigglm.exceptions import DesignError
from bigglm.typing import HRFName

__all__ = [
    "GLOVER",
    "HRF_NAMES",
    "SPM",
    "GammaDifference",
    "convolution_matrix",
    "convolve_regressor",
    "from_time_function",
    "hrf",
    "hrf_basis",
]

#: A user HRF: called as ``f(tr, oversampling)``, returns the kernel on the grid of
#: step ``tr / oversampling`` starting at the event onset.
KernelFunction = Callable[[float, int], ArrayLike]

#: The named HRF models understood by :func:`hrf` and :func:`bigglm.design.make_design`.
HRF_NAMES: tuple[str, ...] = get_args(HRFName)

# Finite-difference steps of the derivative regressors (seconds, and dispersion units).
_TIME_STEP = 0.1
_DISPERSION_STEP = 0.01


@dataclass(frozen=True)
class GammaDifference:
    """Parameters of a peak-minus-undershoot gamma-density HRF.

    Attributes
    ----------
    delay, undershoot : float
        Shape times scale of the peak and undershoot gamma densities (seconds).
    dispersion, u_dispersion : float
        Scales of the peak and undershoot densities.
    ratio : float
        Weight of the undershoot density.
    """

    delay: float = 6.0
    undershoot: float = 16.0
    dispersion: float = 1.0
    u_dispersion: float = 1.0
    ratio: float = 0.167

    def sample(
        self, tr: float, oversampling: int = 50, time_length: float = 32.0, onset: float = 0.0
    ) -> NDArray[np.float64]:
        """Sample the kernel on the oversampled grid and scale it to unit sum.

        Parameters
        ----------
        tr : float
            Repetition time (s).
        oversampling : int
            Samples per TR.
        time_length : float
            Kernel length (s).
        onset : float
            Delay of the response (s).

        Returns
        -------
        numpy.ndarray
            The kernel, ``round(time_length * oversampling / tr)`` samples.

        Examples
        --------
        >>> SPM.sample(2.0, oversampling=1, time_length=20.0).round(3)[:4]
        array([0.   , 0.   , 0.161, 0.443])
        """
        step = tr / oversampling
        n_samples = int(np.rint(float(time_length) / step))
        times = np.linspace(0.0, time_length, n_samples) - onset
        peak = _gamma_pdf(times, self.delay / self.dispersion, step, self.dispersion)
        under = _gamma_pdf(times, self.undershoot / self.u_dispersion, step, self.u_dispersion)
        kernel = peak - self.ratio * under
        return np.asarray(kernel / kernel.sum(), dtype=np.float64)


def _gamma_pdf(
    x: NDArray[np.float64], shape: float, loc: float, scale: float
) -> NDArray[np.float64]:
    """``scipy.stats.gamma.pdf(x, shape, loc=loc, scale=scale)``, by SciPy's own formula.

    ``exp((shape - 1) log(y) - y - lgamma(shape)) / scale`` with ``y = (x - loc) / scale``,
    0 for ``y < 0``, NaN for ``shape <= 0``. Written out because importing scipy.stats
    takes about a second and ``bigglm validate`` builds every design.
    """
    y = (x - loc) / scale
    if shape <= 0:
        return np.full_like(y, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        power = 0.0 if shape == 1.0 else (shape - 1.0) * np.log(y)  # scipy's xlogy
        density = np.exp(power - y - math.lgamma(shape)) / scale
    return np.where(y >= 0, density, 0.0)


#: SPM's canonical HRF (peak 6 s, undershoot 16 s, ratio 1/6).
SPM = GammaDifference()
#: Glover's (1999) HRF as parameterised by nilearn.
GLOVER = GammaDifference(undershoot=12.0, dispersion=0.9, u_dispersion=0.9, ratio=0.48)


def _gamma_basis(
    shape: GammaDifference,
    n_kernels: int,
    tr: float,
    oversampling: int,
    time_length: float,
    onset: float,
) -> list[NDArray[np.float64]]:
    """Kernel, then its time derivative, then its dispersion derivative (first n)."""
    main = shape.sample(tr, oversampling, time_length, onset)
    kernels = [main]
    if n_kernels > 1:
        later = shape.sample(tr, oversampling, time_length, onset + _TIME_STEP)
        kernels.append((main - later) / _TIME_STEP)
    if n_kernels > 2:
        # nilearn varies only the peak dispersion, with the undershoot scale at 1 and the
        # peak delay at 6 s for both models; kept for identical columns.
        base = GammaDifference(
            undershoot=shape.undershoot, ratio=shape.ratio, dispersion=shape.dispersion
        )
        wider = replace(base, dispersion=base.dispersion + _DISPERSION_STEP)
        kernels.append(
            (
                base.sample(tr, oversampling, time_length, onset)
                - wider.sample(tr, oversampling, time_length, onset)
            )
            / _DISPERSION_STEP
        )
    return kernels


def _fir_basis(oversampling: int, delays: Sequence[int]) -> list[NDArray[np.float64]]:
    """One boxcar kernel of one TR per delay (in scans), of unit sum."""
    kernels = []
    for delay in delays:
        kernel = np.zeros((int(delay) + 1) * oversampling)
        kernel[int(delay) * oversampling :] = 1.0 / oversampling
        kernels.append(kernel)
    return kernels


def _callable_basis(
    models: Sequence[KernelFunction], tr: float, oversampling: int
) -> list[NDArray[np.float64]]:
    """Evaluate user kernels, with a clear error when one cannot be called."""
    kernels = []
    for model in models:
        name = getattr(model, "__name__", repr(model))
        try:
            kernel = np.asarray(model(tr, oversampling), dtype=np.float64)
        except TypeError as err:
            raise DesignError(
                f"HRF callable {name!r} failed when called as f(tr, oversampling): {err}; "
                "wrap a function of time with bigglm.design.from_time_function"
            ) from err
        if kernel.ndim != 1 or kernel.size == 0 or not np.all(np.isfinite(kernel)):
            raise DesignError(
                f"HRF callable {name!r} must return a non-empty 1-D array of finite values, "
                f"got shape {kernel.shape}"
            )
        kernels.append(kernel)
    return kernels


def hrf_basis(
    model: str | KernelFunction | Sequence[KernelFunction] | None,
    tr: float,
    oversampling: int = 50,
    *,
    time_length: float = 32.0,
    onset: float = 0.0,
    fir_delays: Sequence[int] | None = None,
) -> list[NDArray[np.float64]]:
    """Every kernel of an HRF model, in the order of the design columns.

    Parameters
    ----------
    model : str, callable, sequence of callables or None
        One of :data:`HRF_NAMES`, a callable ``f(tr, oversampling)``, a list of them, or
        None for no convolution (a boxcar sampled at the frame times).
    tr : float
        Repetition time (s).
    oversampling : int
        Samples per TR of the convolution grid.
    time_length, onset : float
        Kernel length and delay (s), for the named gamma models.
    fir_delays : sequence of int, optional
        Delays in scans, for ``"fir"``.

    Returns
    -------
    list of numpy.ndarray
        One kernel per column the model makes for each condition.

    Raises
    ------
    DesignError
        If the model is unknown, or ``"fir"`` is given without delays.

    Examples
    --------
    >>> [k.shape for k in hrf_basis("glover + derivative", 2.0, 10)]
    [(160,), (160,)]
    """
    if model is None:
        identity = np.zeros(oversampling)
        identity[0] = 1.0
        return [identity]
    if callable(model):
        return _callable_basis([model], tr, oversampling)
    if isinstance(model, str):
        key = model.lower()
        if key == "fir":
            if fir_delays is None or len(fir_delays) == 0:
                raise DesignError("hrf='fir' needs fir_delays, e.g. fir_delays=[0, 1, 2]")
            return _fir_basis(oversampling, fir_delays)
        family, _, rest = key.partition(" + ")
        n_kernels = {"": 1, "derivative": 2, "derivative + dispersion": 3}.get(rest)
        shapes = {"spm": SPM, "glover": GLOVER}
        if family in shapes and n_kernels is not None:
            return _gamma_basis(shapes[family], n_kernels, tr, oversampling, time_length, onset)
        raise DesignError(
            f"unknown hrf model {model!r}; use one of {', '.join(HRF_NAMES)}, None, "
            "or a callable f(tr, oversampling)"
        )
    if isinstance(model, Sequence) and all(callable(m) for m in model):
        return _callable_basis(cast(Sequence[KernelFunction], model), tr, oversampling)
    raise DesignError(f"cannot use {model!r} as an hrf model; give a name or a callable")


def hrf(
    name_or_callable: str | KernelFunction,
    tr: float,
    oversampling: int = 50,
    time_length: float = 32.0,
    onset: float = 0.0,
) -> NDArray[np.float64]:
    """Sample an HRF model on the oversampled grid of step ``tr / oversampling``.

    Parameters
    ----------
    name_or_callable : str or callable
        ``"spm"``, ``"glover"``, one of their ``" + derivative"`` /
        ``" + derivative + dispersion"`` forms, or a callable ``f(tr, oversampling)``.
    tr : float
        Repetition time (s).
    oversampling : int, default=50
        Samples per TR.
    time_length : float, default=32.0
        Kernel length (s); ignored for callables.
    onset : float, default=0.0
        Delay of the response (s); ignored for callables.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_samples,)`` for a single-kernel model, ``(n_kernels, n_samples)`` for
        the derivative models (HRF, time derivative, dispersion derivative).

    Raises
    ------
    DesignError
        For ``"fir"`` (its kernels depend on ``fir_delays``: use :func:`hrf_basis`) or
        an unknown name.

    Examples
    --------
    >>> hrf("glover", tr=2.0, oversampling=1, time_length=20.0).round(3)[:4]
    array([0.   , 0.   , 0.226, 0.741])
    >>> hrf("spm + derivative", tr=2.0).shape
    (2, 800)
    """
    if isinstance(name_or_callable, str) and name_or_callable.lower() == "fir":
        raise DesignError("hrf('fir') depends on fir_delays; use hrf_basis('fir', ...)")
    kernels = hrf_basis(name_or_callable, tr, oversampling, time_length=time_length, onset=onset)
    return kernels[0] if len(kernels) == 1 else np.vstack(kernels)


def from_time_function(
    function: Callable[[NDArray[np.float64]], ArrayLike],
    *,
    time_length: float = 32.0,
    name: str | None = None,
    unit_sum: bool = True,
) -> KernelFunction:
    """Turn an HRF written as a function of time (s) into an ``hrf=`` callable.

    Parameters
    ----------
    function : callable
        ``function(times)`` returns the response at ``times`` seconds after the event.
    time_length : float, default=32.0
        Kernel length (s).
    name : str, optional
        The column suffix (``"<condition>_<name>"``); defaults to ``function.__name__``.
    unit_sum : bool, default=True
        Scale the sampled kernel to unit sum (as the named models are), so that a long
        block plateaus at 1 whatever the oversampling.

    Returns
    -------
    callable
        ``kernel(tr, oversampling)``, sampling ``function`` at ``arange(0, time_length, dt)``.

    Examples
    --------
    >>> import numpy as np
    >>> boxcar = from_time_function(lambda t: (t < 4).astype(float), name="box")
    >>> boxcar.__name__, boxcar(2.0, 2).round(2)[:10]
    ('box', array([0.25, 0.25, 0.25, 0.25, 0.  , 0.  , 0.  , 0.  , 0.  , 0.  ]))
    """

    def kernel(tr: float, oversampling: int) -> NDArray[np.float64]:
        times = np.arange(0.0, time_length, tr / oversampling)
        values = np.asarray(function(times), dtype=np.float64)
        if unit_sum:
            total = values.sum()
            if total == 0:
                raise DesignError(f"HRF {kernel.__name__!r} sums to zero; pass unit_sum=False")
            values = values / total
        return values

    kernel.__name__ = str(name or getattr(function, "__name__", "hrf"))
    return kernel


def convolution_matrix(kernel: ArrayLike, n: int) -> NDArray[np.float64]:
    """The N × (N + M − 1) matrix whose row ``i`` is the kernel shifted by ``i``.

    For a neural signal ``s`` of length N, ``s @ convolution_matrix(h, N)`` equals
    ``numpy.convolve(s, h)`` (the full convolution), and ``S[j, i] == h[i - j]``.

    Parameters
    ----------
    kernel : array_like
        The M kernel samples.
    n : int
        Length N of the signal.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, n + m - 1)``.

    Raises
    ------
    DesignError
        If the kernel is not 1-D and non-empty or ``n < 1``.

    Examples
    --------
    >>> convolution_matrix([1.0, 2.0], 3)
    array([[1., 2., 0., 0.],
           [0., 1., 2., 0.],
           [0., 0., 1., 2.]])
    """
    h = np.asarray(kernel, dtype=np.float64)
    if h.ndim != 1 or h.size == 0 or n < 1:
        raise DesignError(
            f"convolution_matrix needs a non-empty 1-D kernel and n >= 1, "
            f"got kernel shape {h.shape} and n={n}"
        )
    lag = np.arange(n + h.size - 1)[None, :] - np.arange(n)[:, None]
    inside = (lag >= 0) & (lag < h.size)
    return np.where(inside, h[np.clip(lag, 0, h.size - 1)], 0.0)


def convolve_regressor(signal: ArrayLike, kernel: ArrayLike) -> NDArray[np.float64]:
    """Causal convolution truncated to the signal's length (the fast path).

    Uses FFT convolution for long inputs (exact to rounding, ~1e-15 of the largest value)
    and direct convolution for short ones.

    Parameters
    ----------
    signal, kernel : array_like
        1-D arrays on the same time grid.

    Returns
    -------
    numpy.ndarray
        ``numpy.convolve(signal, kernel)[: len(signal)]``.

    Examples
    --------
    >>> convolve_regressor([1.0, 0.0, 0.0, 1.0], [1.0, 0.5])
    array([1. , 0.5, 0. , 1. ])
    """
    s = np.asarray(signal, dtype=np.float64)
    h = np.asarray(kernel, dtype=np.float64)
    if s.size * h.size > 200_000:
        # by FFT, as scipy.signal.fftconvolve (whose import takes about a second)
        n = 1 << (s.size + h.size - 2).bit_length()  # a power of two >= the full length
        full = np.fft.irfft(np.fft.rfft(s, n) * np.fft.rfft(h, n), n)
    else:
        full = np.convolve(s, h)
    return np.asarray(full[: s.size], dtype=np.float64)
