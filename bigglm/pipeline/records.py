"""Whether a step's output is current: step keys, step records and input checksums.

Every step's key comes from :func:`step_key`: the step's name, the version of its code
(:data:`STEP_VERSIONS`) and every input that changes its output: files by content
(SHA-256, remembered across runs by :class:`Checksums`), stores by
:func:`store_identity` (their sources, grid, TR, conversion parameters and voxels),
designs by their values (:func:`design_key`), and the options the step uses. A
downstream step's key includes its upstream steps' keys or identities, so a rerun
recomputes exactly the steps whose inputs changed.

A step's record (``<outputs>/.bigglm/steps/<unit>/<step>.json``, :class:`StepRecords`)
is written only after its outputs are complete (each written under a temporary name,
then renamed), so a run killed at any point leaves either a finished step or none.

Internal to :mod:`bigglm.pipeline`; its steps are in :mod:`bigglm.pipeline.steps`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bigglm.exceptions import StoreError
from bigglm.pipeline.plan import STATE, RunPlan, UnitPlan
from bigglm.report import sha256_file, write_json_atomic

__all__ = [
    "STEP_VERSIONS",
    "Checksums",
    "StepRecords",
    "design_key",
    "step_key",
    "store_holds",
    "store_identity",
    "store_matches",
]

logger = logging.getLogger(__name__)


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _frame_digest(frame: pd.DataFrame) -> str:
    return hashlib.sha256(frame.to_csv(sep="\t", float_format="%.17g").encode()).hexdigest()


#: The version of each step's code. Bump a step's number when it would write other
#: outputs from the same inputs: every record made by the older code is then stale.
STEP_VERSIONS: dict[str, int] = {
    "convert": 2,
    "designs": 2,
    "fit": 2,
    "contrast": 3,  # 3: stat-t / stat-F, not stat-stat
    "residuals": 2,
    "group": 1,
}


def step_key(step: str, *inputs: Any) -> str:
    """The key of a step: a digest of its name, its code version and all its inputs.

    Examples
    --------
    >>> step_key("fit", "ols") == step_key("fit", "ols") != step_key("fit", "ar1")
    True
    """
    return _digest(step, STEP_VERSIONS[step], *inputs)


def store_identity(path: Path) -> str:
    """The content identity of a converted store, read from its attributes and mask.

    It covers what the store's values depend on: the SHA-256 of its sources, its grid
    (affine, volume shape), TR, conversion parameters (chunks, codec, dtype) and its
    voxels (a digest of the mask array; for a surface store, of its geometry and the
    arrays that say what each column is), not where it lies nor when it was made.

    Raises
    ------
    StoreError
        If ``path`` is not a readable store.
    """
    from bigglm.io import open_run

    ds = open_run(path)
    attrs = ds.attrs
    parameters = {k: v for k, v in dict(attrs.get("parameters", {})).items() if k != "mask"}
    return _digest(
        [source.get("sha256") for source in attrs.get("sources", [])],
        attrs.get("affine"),
        attrs.get("volume_shape"),
        attrs.get("tr"),
        parameters,
        int(ds.sizes["time"]),
        _columns_digest(ds),
    )


def _columns_digest(ds: Any) -> str | list[Any]:
    """What the store's columns are: its mask's digest (volumes), or its geometry and
    a digest of each per-column array (surfaces)."""
    from bigglm.io.geometry import GEOMETRY_ARRAYS, GEOMETRY_ATTRS, geometry_of

    # read here by threads, not as a task of the default client's cluster: small arrays
    if "mask" in ds:
        mask = np.asarray(ds["mask"].compute(scheduler="threads").values, dtype=bool)
        return hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()
    arrays = GEOMETRY_ARRAYS[geometry_of(ds.attrs)]
    digests = [
        hashlib.sha256(np.ascontiguousarray(ds[name].values).tobytes()).hexdigest()
        for name in arrays
    ]
    return [{key: ds.attrs.get(key) for key in GEOMETRY_ATTRS}, digests]


class StepRecords:
    """Records of finished steps for one unit, and their timings for the provenance."""

    def __init__(self, outputs: Path, unit: str) -> None:
        self.folder = outputs / STATE / "steps" / unit
        self.timings: dict[str, dict[str, Any]] = {}

    def done(self, step: str, key: str, outputs: Sequence[Path]) -> bool:
        record = self.folder / f"{step}.json"
        try:
            stored = json.loads(record.read_text())
        except (OSError, ValueError):
            return False
        finished = stored.get("key") == key and all(Path(p).exists() for p in outputs)
        if finished and step not in self.timings:  # not run earlier in this session
            self.timings[step] = {"status": "reused", "seconds": stored.get("seconds", 0.0)}
            logger.info("%s: %s already done, skipped", self.folder.name, step)
        return finished

    def adopt(self, step: str, key: str) -> None:
        """Record as finished a step whose outputs were made outside this workflow."""
        logger.info(
            "%s: %s: reusing an existing output made from the same inputs", self.folder.name, step
        )
        self._write(step, key, 0.0, "reused")

    @contextmanager
    def running(self, step: str, key: str) -> Iterator[None]:
        start = time.perf_counter()
        logger.info("%s: %s ...", self.folder.name, step)
        yield
        self.record(step, key, time.perf_counter() - start)

    def record(self, step: str, key: str, seconds: float) -> None:
        """Record a step that ran (here or on a worker) as finished."""
        self._write(step, key, round(seconds, 3), "ran")

    def _write(self, step: str, key: str, seconds: float, status: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        finished = datetime.now(UTC).isoformat()
        record = {"key": key, "seconds": seconds, "finished": finished}
        write_json_atomic(self.folder / f"{step}.json", record)
        self.timings[step] = {"status": status, "seconds": seconds}


def design_key(unit: UnitPlan) -> str:
    """The key of the designs step: the values of every run's design."""
    return step_key("designs", [_frame_digest(rp.design) for rp in unit.runs])


#: (resolved path, size, mtime_ns, ctime_ns, inode) of an input file.
_StatKey = tuple[str, int, int, int, int]

#: Files modified this recently before hashing are not remembered (nanoseconds).
_SETTLE_NS = 2_000_000_000


class Checksums:
    """SHA-256 of input files, computed once and remembered across runs.

    With a ``folder`` (the workflow's ``<outputs>/.bigglm/checksums``), each digest is
    kept in a small file keyed by the input's resolved path, with the file's size, inode,
    modification and change times (as git's index does): a rerun reads again only the
    files that changed, not the whole dataset. Any change of content changes the change
    time (which no user call can set back), so a stale digest is never reused. A file
    modified less than :data:`_SETTLE_NS` before it was hashed is not remembered (it may
    still be being written within the same timestamp tick).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = f.write_text("abc")
    >>> Checksums()(f)[:16]
    'ba7816bf8f01cfea'
    """

    def __init__(self, folder: Path | None = None) -> None:
        self._known: dict[_StatKey, str] = {}
        self._folder = folder

    def __call__(self, path: Path) -> str:
        key = self._key(path)
        if key not in self._known:
            digest = self._stored(key)
            if digest is None:
                started = time.time_ns()
                digest = sha256_file(path)
                self._remember(key, digest, started)
            self._known[key] = digest
        return self._known[key]

    def prefetch(self, paths: Sequence[Path], client: Any) -> None:
        """Hash the files not known yet on the client's workers, in parallel.

        The files must be readable by the workers (a shared filesystem, as for
        conversion on workers).
        """
        todo = []
        for key, path in {self._key(p): p for p in paths}.items():
            if key not in self._known and (digest := self._stored(key)) is not None:
                self._known[key] = digest
            if key not in self._known:
                todo.append((key, path))
        if not todo:
            return
        started = time.time_ns()
        # absolute: a worker's working directory need not be this process's
        futures = client.map(sha256_file, [str(p.resolve()) for _, p in todo], pure=False)
        for (key, _), digest in zip(todo, client.gather(futures), strict=True):
            self._known[key] = digest
            self._remember(key, digest, started)

    def _entry(self, key: _StatKey) -> Path | None:
        if self._folder is None:
            return None
        return self._folder / f"{hashlib.sha256(key[0].encode()).hexdigest()[:32]}.json"

    def _stored(self, key: _StatKey) -> str | None:
        """The remembered digest of a file in exactly this state, if any."""
        entry = self._entry(key)
        if entry is None:
            return None
        try:
            record = json.loads(entry.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("stat") != list(key):
            return None
        digest = record.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def _remember(self, key: _StatKey, digest: str, started: int) -> None:
        entry = self._entry(key)
        if entry is None or key[2] > started - _SETTLE_NS:
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(entry, {"stat": list(key), "sha256": digest})

    @staticmethod
    def _key(path: Path) -> _StatKey:
        stat = path.stat()
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def store_matches(rp: RunPlan, sums: Checksums, mask: Path | Mapping[str, Path] | None) -> bool:
    """A complete store exists, made from files with the same SHA-256 and the same TR.

    With ``mask``, the store's voxels must also be those of that mask (less the voxels
    with non-finite values that conversion dropped, as its attributes record); with a
    GIFTI mask per hemisphere, its vertices exactly.
    """
    return store_holds(rp.store, [sums(path) for path in rp.run.files], rp.tr, mask)


def store_holds(
    store: Path, sha256: str | Sequence[str], tr: float, mask: Path | Mapping[str, Path] | None
) -> bool:
    """:func:`store_matches` for a store, its sources' digests (the bold's, or a GIFTI
    run's left and right series') and a TR (on a worker too)."""
    from bigglm.io import open_run

    if not store.exists():
        return False
    try:
        ds = open_run(store)
    except StoreError:
        return False
    recorded = [s.get("sha256") for s in ds.attrs.get("sources", [])]
    wanted = [sha256] if isinstance(sha256, str) else list(sha256)
    if recorded != wanted or abs(float(ds.attrs.get("tr", 0)) - tr) > 1e-9:
        return False
    if mask is None:
        return True
    return _has_voxels_of(ds, mask) if isinstance(mask, Path) else _has_vertices_of(ds, mask)


def _has_vertices_of(ds: Any, mask: Mapping[str, Path]) -> bool:
    """The store's vertices are exactly those of a GIFTI mask per hemisphere."""
    from bigglm.io.geometry import HEMISPHERES

    if "vertex" not in ds or set(ds.attrs.get("hemispheres", {})) != set(mask):
        return False
    codes, vertices = ds["hemisphere"].values, ds["vertex"].values
    for hemi, path in mask.items():
        image: Any = nib.load(path)
        wanted = np.flatnonzero(np.asarray(image.darrays[0].data) != 0)
        if not np.array_equal(vertices[codes == HEMISPHERES.index(hemi)], wanted):
            return False
    return True


def _has_voxels_of(ds: Any, mask: Path) -> bool:
    """The store's voxels are the mask's, less the non-finite ones conversion dropped."""
    image: Any = nib.load(mask)
    wanted = np.asarray(image.dataobj)
    wanted = np.isfinite(wanted) & (wanted != 0)
    inside = np.asarray(ds["mask"].values, dtype=bool)
    if inside.shape != wanted.shape or (inside & ~wanted).any():
        return False
    dropped = int(dict(ds.attrs.get("parameters", {})).get("nonfinite_voxels_dropped", 0))
    return int(wanted.sum()) - int(inside.sum()) == dropped
