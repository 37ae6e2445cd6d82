"""Warnings attributed to the first caller outside ``bigglm.design``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from bigglm.exceptions import BigGLMWarning

_PACKAGE = str(Path(__file__).resolve().parent)


def warn_caller(message: str) -> None:
    """Issue a BigGLMWarning pointing at the code that called into ``bigglm.design``.

    Parameters
    ----------
    message : str
        What was found and what to do.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_caller("look")
    >>> caught[0].category.__name__, str(caught[0].message)
    ('BigGLMWarning', 'look')
    """
    level = 1
    frame = sys._getframe(1)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, BigGLMWarning, stacklevel=level + 1)
