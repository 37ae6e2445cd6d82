"""Import optional dependencies through one helper whose error names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says which extra installs it.

    Parameters
    ----------
    module : str
        Importable module name, e.g. ``"nilearn"``.
    extra : str
        The bigglm extra that provides it, e.g. ``"bench"``.

    Returns
    -------
    types.ModuleType
        The imported module.

    Raises
    ------
    ImportError
        If the module is not installed.

    Examples
    --------
    >>> require("json", "none").__name__
    'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module!r} is needed for this feature but is not installed; "
            f"install it with: pip install 'bigglm[{extra}]'"
        ) from err
