"""The noise model option (``"ols"``, ``"arP"``, ``"spm-ar1"`` or ``"film"``) and the run length.

One home for the checks that :func:`bigglm.fit`, the YAML config (``model.noise``), the
``bigglm fit --noise`` flag and ``bigglm validate`` share. Pure Python: reading a config
imports no numerical library.
"""

from __future__ import annotations

import re

from bigglm.exceptions import DesignError

__all__ = ["check_fit_size", "noise_order"]

_NOISE = re.compile(r"ols|spm-ar1|film|ar([1-9][0-9]*)")
#: What a wrong noise option is told to use.
_CHOICES = "use 'ols', 'arN' (e.g. 'ar1'), 'spm-ar1' or 'film'"


def noise_order(noise: object) -> int:
    """0 for ``"ols"``, P for ``"arP"`` (P >= 1), 0 for ``"spm-ar1"`` and ``"film"``.

    ``"spm-ar1"`` is SPM's AR(0.2) model (:mod:`bigglm.glm.pooled`): one whitening matrix
    for all voxels, so each voxel's fit is OLS of whitened data. ``"film"`` is FSL FILM's
    prewhitening (:mod:`bigglm.glm.film`): each voxel whitened by its own autocorrelation.

    Parameters
    ----------
    noise : str
        ``"ols"``, ``"ar1"``, ``"ar2"``, ..., ``"spm-ar1"`` or ``"film"``.

    Returns
    -------
    int
        The AR order.

    Raises
    ------
    DesignError
        If the text is not a noise model.

    Examples
    --------
    >>> noise_order("ols"), noise_order("ar2"), noise_order("spm-ar1")
    (0, 2, 0)
    >>> noise_order("ar0")
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: 'ar0' is not a noise model; use 'ols', 'arN' (e.g. ...
    """
    match = _NOISE.fullmatch(noise) if isinstance(noise, str) else None
    if match is None:
        raise DesignError(f"{noise!r} is not a noise model; {_CHOICES}")
    return int(match.group(1) or 0)


def check_fit_size(n_scans: int, n_regressors: int, order: int, run: str = "the run") -> None:
    """Refuse a fit with too few scans: more than ``n_regressors + 2 * order`` are needed.

    With ``p`` regressors and AR(P) noise the residuals must have degrees of freedom left
    after the regressors and the AR estimate.

    Raises
    ------
    DesignError
        Naming the counts and what to lower.

    Examples
    --------
    >>> check_fit_size(60, 7, 1)
    >>> check_fit_size(60, 7, 100000, "sub-01")
    Traceback (most recent call last):
    ...
    bigglm.exceptions.DesignError: sub-01 has 60 volumes, too few for 7 regressors and ...
    """
    if n_scans <= n_regressors + 2 * order:
        noise = f"AR({order}) noise" if order else "OLS"
        raise DesignError(
            f"{run} has {n_scans} volumes, too few for {n_regressors} regressors and {noise}: "
            f"a fit needs more than {n_regressors + 2 * order}; use fewer regressors (a lower "
            "high_pass or drift_order, fewer confounds or FIR delays) or a lower AR order"
        )
