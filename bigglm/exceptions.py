"""The exceptions and warnings bigglm raises.

Every error message says what was found, what was expected, and how to fix it.
"""

from __future__ import annotations

import os
import stat

__all__ = [
    "BigGLMWarning",
    "ConfigError",
    "DesignError",
    "StoreDamaged",
    "StoreError",
    "not_a_regular_file",
]


class DesignError(ValueError):
    """A design matrix, events table, confounds table or contrast is invalid."""


class StoreError(OSError):
    """A source file or Zarr store is missing, unreadable, incomplete or inconsistent.

    An ``OSError``, as the system's own errors about files are: code that handles a
    file that cannot be read (``except OSError``) handles bigglm's too, and the CLI
    shows both as one line (its :data:`bigglm.cli.USER_ERRORS`; a StoreError by its
    message, the system's by path and reason).

    The other side of it: an ``except OSError`` meant for the system's errors also
    catches a StoreError (or :class:`StoreDamaged`), which must not be swallowed or
    reworded. bigglm's handlers take care of it: the NIfTI read loop
    (:mod:`bigglm.io.nifti`) re-raises a StoreError before it turns an ``OSError`` into
    "read error", and :class:`bigglm.io.integrity.ChunkReader` passes every ``OSError``
    on unchanged. Every other ``except OSError`` in bigglm wraps one call of the
    standard library (reading a small file, ``stat``), from which no StoreError can
    come; a new handler around bigglm code must re-raise StoreError first.
    """


class StoreDamaged(StoreError):
    """A store bigglm wrote has a missing chunk, or one that fails its checksum.

    ``store`` is the store's path as given in the message; the data can only be had
    again by converting the source anew.

    Examples
    --------
    >>> import pickle
    >>> err = pickle.loads(pickle.dumps(StoreDamaged("run.zarr: chunk ... is damaged", "run.zarr")))
    >>> err.store, isinstance(err, StoreError)
    ('run.zarr', True)
    """

    def __init__(self, message: str, store: str) -> None:
        super().__init__(message)
        self.store = store

    def __reduce__(self) -> tuple[type[StoreDamaged], tuple[str, str]]:
        return type(self), (str(self), self.store)


class ConfigError(ValueError):
    """A YAML configuration or a cluster profile is invalid."""


class BigGLMWarning(UserWarning):
    """Something suspicious that bigglm handled (for example NaN voxels dropped from a mask)."""


def not_a_regular_file(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as an input file, or None when it is a regular file.

    A named pipe or a device exists but is not a file: reading it could block forever,
    so it gets its own message instead of "no such file".

    Examples
    --------
    >>> not_a_regular_file("/nope/bold.nii.gz")
    'does not exist'
    >>> not_a_regular_file("/")
    'is a folder, not a file'
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be opened ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or socket"
    return f"is {kind}, not a regular file"
