"""The provenance record of an analysis: configuration, versions, input checksums, timings.

Written as JSON next to the maps, atomically (through :mod:`bigglm.io.artefacts`: a
temporary file in the same folder, then a rename), so a reader never sees half a record.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["environment", "file_record", "sha256_file", "write_json_atomic"]

#: Packages whose versions decide the numbers a run produces.
_PACKAGES = (
    "bigglm",
    "numpy",
    "scipy",
    "pandas",
    "xarray",
    "zarr",
    "dask",
    "distributed",
    "nibabel",
    "pydantic",
    "dask-jobqueue",
)
_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    str
        The hex digest.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"
    >>> _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"path", "size", "sha256"}`` for one input file (the store's ``sources`` format).

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    dict
        Absolute path, size in bytes, and SHA-256.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"
    >>> _ = p.write_bytes(b"abc")
    >>> file_record(p)["size"]
    3
    """
    path = Path(path).resolve()
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


def environment() -> dict[str, Any]:
    """Python, platform and the versions of the packages that shape the results.

    Returns
    -------
    dict
        ``python``, ``platform``, ``packages`` (name -> version or ``None``).

    Examples
    --------
    >>> sorted(environment())
    ['packages', 'platform', 'python']
    """
    packages: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": packages}


def write_json_atomic(
    path: str | Path, record: Mapping[str, Any], *, artefact: bool = False
) -> Path:
    """Write a JSON document so that ``path`` is either absent or complete.

    Parameters
    ----------
    path : str or Path
        Target file; its folder must exist.
    record : Mapping
        JSON-serialisable data (paths are written as strings).
    artefact : bool
        An output (the provenance record): marked as bigglm's (a top-level
        ``"bigglm_artefact": "provenance"``) and written by
        :func:`bigglm.io.artefacts.writing`, so only a record bigglm wrote is replaced.
        Otherwise a file of the pipeline's own state (under ``<outputs>/.bigglm/``),
        written by :func:`bigglm.io.artefacts.replace_atomically`.

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import tempfile, pathlib, json
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
    >>> json.loads(write_json_atomic(p, {"a": 1}).read_text())
    {'a': 1}
    """
    from bigglm.io.artefacts import MARKER_KEY, replace_atomically, writing

    path = Path(path)
    if not artefact:
        return replace_atomically(path, _json_text(record))
    with writing(path, "provenance", overwrite=True) as stage:
        stage.write_text(_json_text({**record, MARKER_KEY: "provenance"}))
    return path


def _json_text(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
