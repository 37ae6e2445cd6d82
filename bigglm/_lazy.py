"""Lazy public names for bigglm's packages (PEP 562): a name's module loads on first use.

``import bigglm`` then costs milliseconds, and NumPy, pandas, SciPy, Dask, xarray and Zarr
load when a name that needs them is first looked up (``bigglm.fit``, ``from bigglm import
fit``). A package lists where each public name comes from, as its eager imports would::

    if TYPE_CHECKING:  # what type checkers, IDEs and readers see
        from bigglm.glm.engine import fit
    else:
        from bigglm import _lazy

        __getattr__, __dir__ = _lazy.lazy_exports(__name__, {"bigglm.glm.engine": ["fit"]})

``tests/test_imports.py`` checks that every name in a package's ``__all__`` resolves to the
object its ``TYPE_CHECKING`` import names, and that ``import bigglm`` loads none of the
heavy libraries.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, origins: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` that import a package's names on first use.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    origins : mapping of str to sequence of str
        For each module, the names the package takes from it, as in ``from module import
        a, b``. The package itself as the module means its submodules of those names.

    Returns
    -------
    tuple of callable
        ``(__getattr__, __dir__)``, to be assigned at the package's module level. A name
        that was looked up once is then an ordinary attribute of the package.

    Examples
    --------
    >>> import sys, types
    >>> sys.modules["pkg"] = types.ModuleType("pkg")
    >>> getattr_, dir_ = lazy_exports("pkg", {"json": ["dumps"]})
    >>> getattr_("dumps")("lazy")
    '"lazy"'
    >>> "dumps" in dir_()
    True
    >>> getattr_("loads")
    Traceback (most recent call last):
    AttributeError: module 'pkg' has no attribute 'loads'
    >>> del sys.modules["pkg"]
    """
    where = {name: origin for origin, names in origins.items() for name in names}
    module = sys.modules[package]

    def __getattr__(name: str) -> Any:
        origin = where.get(name)
        if origin is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if origin == package:
            value: Any = importlib.import_module(f"{package}.{name}")
        else:
            value = getattr(importlib.import_module(origin), name)
        vars(module)[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(module), *where})

    return __getattr__, __dir__
