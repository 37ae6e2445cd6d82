"""The Examples in bigglm.glm's and bigglm.contrasts' docstrings run and print what they say.

pytest's ``testpaths`` is ``tests``, so the package's doctests are run from here.
"""

from __future__ import annotations

import doctest
import importlib
from collections.abc import Iterator

import dask
import pytest


@pytest.fixture(autouse=True)
def _in_process_scheduler() -> Iterator[None]:
    """Compute with threads in this process, even if an earlier test left a distributed
    client registered as Dask's default (fit(client=None) would otherwise use it)."""
    with dask.config.set(scheduler="threads"):
        yield


MODULES = [
    "bigglm.contrasts",
    "bigglm.glm.ar",
    "bigglm.glm.engine",
    "bigglm.glm.finish",
    "bigglm.glm.result",
    "bigglm.glm.stats",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
