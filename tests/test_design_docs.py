"""The Examples in bigglm.design's docstrings run and print what they say.

pytest's ``testpaths`` is ``tests``, so the package's doctests are run from here.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "bigglm.design._warnings",
    "bigglm.design.confounds",
    "bigglm.design.diagnostics",
    "bigglm.design.drift",
    "bigglm.design.events",
    "bigglm.design.examples",
    "bigglm.design.hrf",
    "bigglm.design.matrix",
    "bigglm.design.orthogonal",
    "bigglm.design.plot",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
