"""The exceptions and warnings bigglm raises.

Every error message says what was found, what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = ["BigGLMWarning", "ConfigError", "DesignError", "StoreError"]


class DesignError(ValueError):
    """A design matrix, events table, confounds table or contrast is invalid."""


class StoreError(OSError):
    """A source file or Zarr store is missing, unreadable, incomplete or inconsistent."""


class ConfigError(ValueError):
    """A YAML configuration or a cluster profile is invalid."""


class BigGLMWarning(UserWarning):
    """Something suspicious that bigglm handled (for example NaN voxels dropped from a mask)."""
