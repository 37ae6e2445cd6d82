"""The one place that decides whether bigglm may write, replace or delete a path.

The rule: **no function deletes or replaces a path it cannot prove bigglm wrote.** Every
file and store bigglm writes carries a marker naming its *kind*, and a path is replaced
only by an artefact of the same kind, only with ``overwrite``. Anything else there (a
user's folder or file, a Zarr store of another tool, a bigglm artefact of another kind,
a symbolic link) is refused, whatever ``overwrite`` says.

Markers, by format (read back by :func:`kind_of`):

- Zarr stores: ``"bigglm_artefact": {"kind": ...}`` in the root group's attributes.
  Stores of earlier versions are recognised too: root attributes ``"bigglm"`` and
  ``"complete": true`` (a run store; a residuals store when ``bigglm.residuals`` is
  set), or ``"bigglm_result"`` (a GLM result);
- NIfTI images (CIFTI-2 ones too, NIfTI-2): the header's ``descrip`` is ``"bigglm <kind>"``;
  GIFTI images: the file's metadata entry ``bigglm_artefact`` is ``"bigglm <kind>"``;
- JSON: a top-level ``"bigglm_artefact"`` key (provenance of earlier versions: a
  ``"bigglm_step"`` key); HTML: ``<meta name="generator" content="bigglm <kind>">``;
  PNG: the ``Software`` text chunk is ``"bigglm <kind>"``;
- formats with no room for one (the design and cluster TSVs): a JSON sidecar of the same
  stem, as BIDS pairs ``.tsv`` and ``.json`` files (``sub-01_design.tsv``:
  ``sub-01_design.json``), holding ``"bigglm_artefact": {"kind", "sha256"}``, the SHA-256
  of the file's bytes, so an edited or replaced file is no longer bigglm's. The TSV stays
  plain for other tools; a sidecar path holding anything but bigglm's record is refused
  like the target.

Writes are atomic (:func:`writing`): into a hidden staging path beside the target, moved
into place when complete. Each staging path has an owner record beside it (kind, host,
PID, process start time), written before the staging path exists, so a staging path
left by a killed writer is removed (:func:`remove_stale_staging`) only once its owner
is dead, and nothing without such a record is ever removed. Moves into place hold the
target's lock (:func:`bigglm.io.locks.exclusive`), so two writers of one target never
interleave their renames.

bigglm's own small state files (step records, checksums, owner records, the analysis
owner, job scripts; not outputs, so unmarked) are written by :func:`replace_atomically`:
a temporary file in the same folder, flushed to disk, renamed over the target. These two
are the only ways bigglm writes a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from bigglm.exceptions import StoreError
from bigglm.io.locks import Busy, alive, exclusive, me

__all__ = [
    "KINDS",
    "check_outside_stores",
    "check_replaceable",
    "kind_of",
    "marker",
    "remove_stale_staging",
    "replace_atomically",
    "target_lock",
    "writing",
]

logger = logging.getLogger(__name__)

#: What bigglm writes, by kind.
KINDS: Final = (
    "run-store",  # bigglm.convert
    "residuals-store",  # GLMResult.write_residuals(format="zarr")
    "glm-result",  # GLMResult.to_zarr
    "group-store",  # bigglm.group.collect
    "group-result",  # GroupResult.to_zarr
    "image",  # bigglm.to_nifti, to_gifti, to_cifti: contrast maps, residual series
    "mask",  # the pipeline's masks
    "design-table",  # the pipeline's design TSVs (sidecar marker)
    "cluster-table",  # bigglm.inference.tables.write_table TSVs (sidecar marker)
    "figure",  # bigglm.design.plot PNGs
    "report",  # HTML report
    "provenance",  # JSON provenance
)

#: The root attribute (Zarr) or top-level key (JSON) holding a marker.
MARKER_KEY = "bigglm_artefact"

#: Kinds whose marker is a sidecar file rather than part of the content.
_SIDECAR_KINDS = frozenset({"design-table", "cluster-table"})

_GENERATOR = re.compile(rb"<meta name=['\"]generator['\"] content=['\"]bigglm ([a-z-]+)['\"]")


def marker(kind: str) -> str:
    """The text that marks an artefact of ``kind`` (NIfTI descrip, HTML generator, PNG).

    Examples
    --------
    >>> marker("image")
    'bigglm image'
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artefact kind {kind!r}; expected one of {KINDS}")
    return f"bigglm {kind}"


def kind_of(path: str | os.PathLike[str]) -> str | None:
    """The kind of bigglm artefact at ``path``, or None if bigglm did not write it.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "notes.txt").write_text("mine")
    4
    >>> kind_of(folder), kind_of(folder / "notes.txt"), kind_of(folder / "absent")
    (None, None, None)
    """
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return None
    if path.is_dir():
        return _zarr_kind(path)
    return _sidecar_kind(path) or _content_kind(path)


def _zarr_kind(path: Path) -> str | None:
    try:
        attrs = json.loads((path / "zarr.json").read_bytes()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(attrs, dict):
        return None
    mark = attrs.get(MARKER_KEY)
    if isinstance(mark, dict) and mark.get("kind") in KINDS:
        return str(mark["kind"])
    legacy = attrs.get("bigglm_result")
    if isinstance(legacy, dict) and legacy.get("complete") is True:
        return "glm-result"
    meta = attrs.get("bigglm")
    if isinstance(meta, dict) and attrs.get("complete") is True:
        return "residuals-store" if "residuals" in meta else "run-store"
    return None


def _content_kind(path: Path, name: str | None = None) -> str | None:
    """The kind marked in a file's content, its format told by ``name`` (default its own)."""
    name = (name or path.name).lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            return _named(_nifti_descrip(path))
        if name.endswith(".png"):
            return _named(_png_software(path))
        if name.endswith(".gii"):
            return _named(_gifti_marker(path))
        with open(path, "rb") as handle:
            head = handle.read(4096)
        if name.endswith((".html", ".htm")):
            found = _GENERATOR.search(head)
            if found:
                return _named(f"bigglm {found.group(1).decode()}")
            return "report" if b"<h1>bigglm first level:" in head else None
        if name.endswith(".json"):
            return _json_kind(path)
    except Exception:  # unreadable, truncated, another format: not bigglm's, whatever it is
        return None
    return None


def _named(text: str | None) -> str | None:
    """The kind in a marker text ``"bigglm <kind>"``."""
    if text and text.startswith("bigglm ") and text[7:] in KINDS:
        return text[7:]
    return None


def _nifti_descrip(path: Path) -> str:
    """The ``descrip`` of a NIfTI-1 or -2 header (gzipped or not, told by its bytes)."""
    import gzip

    import nibabel as nib

    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if gzipped else open(path, "rb") as handle:
        head = handle.read(540)
    size = int.from_bytes(head[:4], "little")
    size = size if size in (348, 540) else int.from_bytes(head[:4], "big")
    kind = nib.Nifti2Header if size == 540 else nib.Nifti1Header
    header: Any = kind.from_fileobj(io.BytesIO(head))
    return bytes(header["descrip"]).rstrip(b"\0").decode("ascii", "replace")


def _png_software(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("Software")
    return text if isinstance(text, str) else None


def _gifti_marker(path: Path) -> str | None:
    """The ``bigglm_artefact`` entry of a GIFTI file's metadata (:func:`bigglm.to_gifti`)."""
    import nibabel as nib

    text = nib.GiftiImage.from_bytes(path.read_bytes()).meta.get(MARKER_KEY)
    return text if isinstance(text, str) else None


def _json_kind(path: Path) -> str | None:
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        return None
    if record.get(MARKER_KEY) in KINDS:
        return str(record[MARKER_KEY])
    return "provenance" if "bigglm_step" in record else None


def _sidecar(path: Path) -> Path:
    """``x.tsv`` -> ``x.json`` (BIDS's sidecar of a TSV)."""
    return path.with_suffix(".json")


def _sidecar_record(path: Path) -> dict[str, Any] | None:
    """bigglm's record in the sidecar of ``path``, if the sidecar is bigglm's."""
    try:
        record = json.loads(_sidecar(path).read_text())[MARKER_KEY]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = isinstance(record, dict) and record.get("kind") in _SIDECAR_KINDS
    return record if ok and isinstance(record.get("sha256"), list) else None


def _sidecar_kind(path: Path) -> str | None:
    if path.suffix != ".tsv":
        return None
    record = _sidecar_record(path)
    if record is not None and _sha256(path) in record["sha256"]:
        return str(record["kind"])
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the decision --------------------------------------------------------------------


def check_replaceable(target: str | os.PathLike[str], kind: str, *, overwrite: bool) -> None:
    """Refuse a target that holds anything but a same-kind bigglm artefact (with ``overwrite``).

    Parameters
    ----------
    target : path
    kind : str
        One of :data:`KINDS`: what is about to be written.
    overwrite : bool
        Whether an existing artefact of the same kind may be replaced.

    Raises
    ------
    StoreError
        If the target's folder does not exist, or the target exists and is not a
        bigglm artefact of ``kind`` (never replaced), or is one and ``overwrite`` is
        false.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> check_replaceable(folder / "run.zarr", "run-store", overwrite=False)
    >>> (folder / "thesis").mkdir()
    >>> check_replaceable(folder / "thesis", "run-store", overwrite=True)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.StoreError: ...thesis: exists and is not a Zarr store written by bigglm...
    """
    target = Path(target)
    marker(kind)  # a known kind
    if not target.parent.is_dir():
        raise StoreError(f"{target}: folder {target.parent} does not exist; create it first")
    check_outside_stores(target)
    _check_sidecar(target, kind)
    if not (target.exists() or target.is_symlink()):
        return
    found = kind_of(target)
    if found != kind:
        raise StoreError(
            f"{target}: exists and {_describe(target, found)}; refusing to replace it "
            f"(bigglm replaces only a {kind} it wrote), choose another path or move it "
            "away yourself"
        )
    foreign = _foreign_entries_now(target) if target.is_dir() else []
    if foreign:
        listed = ", ".join(str(p.relative_to(target)) for p in foreign[:3])
        raise StoreError(
            f"{target}: is a bigglm {kind} but also holds what bigglm did not write "
            f"({listed}{', ...' if len(foreign) > 3 else ''}); refusing to replace it, "
            "move those out first"
        )
    if not overwrite:
        raise StoreError(f"{target}: already exists; pass overwrite=True to replace it")


def check_outside_stores(target: str | os.PathLike[str]) -> None:
    """Refuse a target inside a Zarr store (``bigglm fit --output run.zarr``): written
    there, it would become part of the store (a user's file to bigglm, a group to Zarr).

    Examples
    --------
    >>> import tempfile, zarr
    >>> store = Path(tempfile.mkdtemp()) / "run.zarr"
    >>> _ = zarr.open_group(store, mode="w")
    >>> (store / "maps").mkdir()
    >>> check_outside_stores(store / "maps" / "z.nii.gz")
    Traceback (most recent call last):
    ...
    bigglm.exceptions.StoreError: ...z.nii.gz: is inside the Zarr store .../run.zarr; ...
    """
    target = Path(target)
    stores = [f for f in Path(os.path.abspath(target)).parents if (f / "zarr.json").is_file()]
    if stores:  # the outermost: the store, not one of its arrays
        found = _zarr_kind(stores[-1])
        what = f"bigglm {found}" if found else "Zarr store"
        raise StoreError(
            f"{target}: is inside the {what} {stores[-1]}; writing there would make it "
            "part of that store, choose a folder outside it"
        )


def _foreign_entries_now(store: Path) -> list[Path]:
    """:func:`_foreign_entries`, or none if another writer swapped the store meanwhile
    (it is renamed away whole, never emptied in place): the check that writer's
    successor makes under the store's lock decides then."""
    try:
        before = store.stat().st_ino
        foreign = _foreign_entries(store)
        after = store.stat().st_ino
    except FileNotFoundError:
        return []
    return foreign if before == after else []


def _foreign_entries(store: Path) -> list[Path]:
    """What a Zarr v3 store folder holds besides its nodes' ``zarr.json`` files, its
    groups and its arrays' chunk files (``c/<i>/<j>...``, ``c`` for a 0-d array): things a
    user put there.

    Examples
    --------
    >>> import tempfile, numpy as np, zarr
    >>> folder = Path(tempfile.mkdtemp()) / "s.zarr"
    >>> zarr.open_group(folder, mode="w").create_array("x", data=np.arange(3))[:].tolist()
    [0, 1, 2]
    >>> _foreign_entries(folder)
    []
    >>> _ = (folder / "x" / "NOTES.txt").write_text("mine")
    >>> [p.name for p in _foreign_entries(folder)]
    ['NOTES.txt']
    """
    foreign: list[Path] = []
    nodes = [store]
    while nodes:
        node = nodes.pop()
        try:
            kind = json.loads((node / "zarr.json").read_bytes()).get("node_type")
        except (OSError, ValueError, AttributeError):
            kind = None
        for entry in sorted(node.iterdir()):
            if entry.name == "zarr.json" and entry.is_file():
                continue
            if kind == "array" and entry.name == "c":  # a file: the chunk of a 0-d array
                foreign += _not_chunks(entry) if entry.is_dir() else []
            elif kind == "group" and entry.is_dir() and (entry / "zarr.json").is_file():
                nodes.append(entry)
            else:
                foreign.append(entry)
    return foreign


def _not_chunks(folder: Path) -> list[Path]:
    """Entries under an array's ``c`` folder that are not chunk files (digit names)."""
    odd: list[Path] = []
    for top, dirs, files in os.walk(folder):
        odd += [Path(top) / n for n in (*dirs, *files) if not n.isdigit()]
        dirs[:] = [d for d in dirs if d.isdigit()]
    return odd


def _check_sidecar(target: Path, kind: str) -> None:
    """Refuse a sidecar kind whose sidecar path holds anything but bigglm's record."""
    if kind not in _SIDECAR_KINDS:
        return
    sidecar = _sidecar(target)
    if (sidecar.exists() or sidecar.is_symlink()) and _sidecar_record(target) is None:
        raise StoreError(
            f"{sidecar}: exists and is not bigglm's record of {target.name}; refusing to "
            "replace it, choose another path or move it away yourself"
        )


def _describe(path: Path, found: str | None) -> str:
    """What is at ``path``, for a refusal."""
    if found is not None:
        return f"is a bigglm {found}"
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is a file not written by bigglm"
    names = sorted(p.name for p in path.iterdir())
    listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    if (path / "zarr.json").is_file():
        return f"is a Zarr store not written by bigglm (it holds {listed})"
    return f"is not a Zarr store written by bigglm (a folder holding {listed or 'nothing'})"


# --- writing -------------------------------------------------------------------------


@contextmanager
def writing(
    target: str | os.PathLike[str],
    kind: str,
    *,
    overwrite: bool,
    directory: bool = False,
    suffix: str = "",
) -> Iterator[Path]:
    """Write an artefact atomically: yield a staging path, move it into place on success.

    The staging path is a hidden sibling of ``target`` (``.<name>.partial-<id><suffix>``),
    a fresh empty folder if ``directory``, otherwise not yet created (the block writes
    the file). The block must write the kind's marker into a file (:func:`marker`);
    Zarr stores and sidecar kinds are marked here. On success the staging path replaces
    ``target`` (only a bigglm artefact of ``kind``, only if ``overwrite``, checked again
    under the target's lock); on failure it is removed, and nothing else is.

    Parameters
    ----------
    target : path
    kind : str
        One of :data:`KINDS`.
    overwrite : bool
        Whether an existing artefact of the same kind may be replaced.
    directory : bool
        Create the staging path as a folder (for a Zarr store).
    suffix : str
        Appended to the staging name, for writers that choose a format by it.

    Yields
    ------
    pathlib.Path
        The staging path.

    Raises
    ------
    StoreError
        As :func:`check_replaceable`, before the block runs; or if the block wrote no
        marker.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "record.json"
    >>> with writing(target, "provenance", overwrite=False) as stage:
    ...     _ = stage.write_text('{"bigglm_artefact": "provenance"}')
    >>> kind_of(target)
    'provenance'
    """
    target = Path(os.path.abspath(Path(target).expanduser()))
    check_replaceable(target, kind, overwrite=overwrite)
    token = uuid.uuid4().hex[:12]
    stage = target.with_name(f".{target.name}.partial-{token}{suffix}")
    owner = _owner_record(target, token)
    _record_owner(owner, kind, [stage.name])
    try:
        if directory:
            stage.mkdir()
        yield stage
        _mark(stage, target, kind)
        with target_lock(target):
            _move_into_place(stage, target, kind, overwrite=overwrite, owner=owner, token=token)
        logger.info("wrote %s", target)
    finally:
        _remove(stage)
        owner.unlink(missing_ok=True)


def target_lock(target: str | os.PathLike[str]) -> Any:
    """The lock of one target path (``.<name>.bigglm-lock`` beside it), held by every
    move into place; hold it around a check-then-write to make that one step.

    Examples
    --------
    >>> import tempfile
    >>> with target_lock(Path(tempfile.mkdtemp()) / "run.zarr"):
    ...     pass
    """
    target = Path(os.path.abspath(Path(target).expanduser()))
    return exclusive(target.with_name(f".{target.name}.bigglm-lock"), reentrant=True)


def _owner_record(target: Path, token: str) -> Path:
    return target.with_name(f".{target.name}.owner-{token}.json")


def _record_owner(owner: Path, kind: str, paths: list[str]) -> None:
    """Write the owner record of staging ``paths`` (names beside it), atomically."""
    replace_atomically(
        owner, json.dumps({"bigglm_staging": {"kind": kind, "paths": paths, **me()}})
    )


def _mark(stage: Path, target: Path, kind: str) -> None:
    """Add the marker a store or sidecar kind carries; check that a file carries its own."""
    if stage.is_dir():
        import zarr

        zarr.open_group(str(stage), mode="r+").attrs[MARKER_KEY] = {"kind": kind}
        found = _zarr_kind(stage)
    else:
        found = _content_kind(stage, target.name) if stage.is_file() else None
    if kind not in _SIDECAR_KINDS and found != kind:
        raise StoreError(
            f"{stage}: was written without the marker of a bigglm {kind}; this is a bug "
            "in bigglm, please report it"
        )


def _move_into_place(
    stage: Path, target: Path, kind: str, *, overwrite: bool, owner: Path, token: str
) -> None:
    """Rename ``stage`` to ``target``; an existing target is checked again first."""
    if target.exists() or target.is_symlink():
        check_replaceable(target, kind, overwrite=overwrite)
    if kind in _SIDECAR_KINDS:
        _write_sidecar(stage, target, kind)
    if not target.exists() or not (stage.is_dir() or target.is_dir()):
        os.replace(stage, target)  # a file replaces a file atomically
        return
    trash = target.with_name(f".{target.name}.old-{token}")
    _record_owner(owner, kind, [stage.name, trash.name])
    os.rename(target, trash)
    if _zarr_kind(trash) != kind:  # changed since it was checked: put it back
        os.rename(trash, target)
        raise StoreError(f"{target}: changed while bigglm replaced it; nothing was replaced")
    os.rename(stage, target)
    _remove(trash)


def _write_sidecar(stage: Path, target: Path, kind: str) -> None:
    digests = [_sha256(stage)]
    if kind_of(target) == kind:  # the old file stays bigglm's until the rename
        digests.append(_sha256(target))
    record = {
        "Description": f"written by bigglm ({kind}); bigglm replaces {target.name} only "
        "while its SHA-256 is one of these",
        MARKER_KEY: {"kind": kind, "sha256": digests},
    }
    # the temporary file is named after the staging path, so it is cleaned up with it
    text = json.dumps(record, indent=2) + "\n"
    replace_atomically(_sidecar(target), text, prefix=f"{stage.name}.json.")


def replace_atomically(
    path: str | os.PathLike[str], data: bytes | str, *, prefix: str = ""
) -> Path:
    """Replace the file ``path`` by ``data`` at once: readers see the old or the new file.

    For bigglm's own state files, which carry no marker (outputs go through
    :func:`writing`). The data goes to a temporary file in ``path``'s folder, is flushed
    to disk (``fsync``), then renamed over ``path``; on any failure the temporary file
    is removed and ``path`` is untouched.

    Parameters
    ----------
    path : path
        The file to write; its folder must exist.
    data : bytes or str
        The new content (text as UTF-8).
    prefix : str
        The temporary file's name starts with this (default ``.<name>.``), for a writer
        whose clean-up finds its temporary files by name.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import tempfile
    >>> state = Path(tempfile.mkdtemp()) / "state.json"
    >>> replace_atomically(state, '{"a": 1}').read_text()
    '{"a": 1}'
    >>> sorted(p.name for p in state.parent.iterdir())
    ['state.json']
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    temp = path.with_name(f"{prefix or f'.{path.name}.'}{uuid.uuid4().hex[:12]}.tmp")
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- clean-up ------------------------------------------------------------------------


def remove_stale_staging(target: str | os.PathLike[str], *, folder: bool = False) -> list[Path]:
    """Remove staging paths of ``target`` whose writer died; return what was removed.

    Only paths named by an owner record (written by :func:`writing`) whose process is
    dead are removed: never a live writer's staging, never anything without a record.

    Parameters
    ----------
    target : path
        The target whose staging paths to clean; with ``folder``, a folder whose every
        target's staging paths to clean.
    folder : bool
        Clean a whole folder.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / ".run.zarr.partial-0123").mkdir()  # no owner record: not bigglm's to remove
    >>> remove_stale_staging(root / "run.zarr"), (root / ".run.zarr.partial-0123").exists()
    ([], True)
    """
    target = Path(os.path.abspath(Path(target).expanduser()))
    where, pattern = (target, ".*.owner-*.json") if folder else (target.parent, None)
    if pattern is None:
        pattern = f".{_glob_escape(target.name)}.owner-*.json"
    removed: list[Path] = []
    for owner in sorted(where.glob(pattern)):
        removed += _remove_if_dead(owner)
    for lock in sorted(where.glob(pattern.replace(".owner-*.json", ".bigglm-lock"))):
        with contextlib.suppress(Busy, FileNotFoundError), exclusive(lock, wait=False):
            pass  # nobody holds it (its holder died): taking it deletes it
    return removed


def _glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove_if_dead(owner: Path) -> list[Path]:
    """Remove what a dead writer's owner record names: its staging path, the old target
    it was replacing (put back if the target is missing), and paths named after them."""
    match = re.fullmatch(r"\.(.+)\.owner-([0-9a-f]{12})\.json", owner.name)
    try:
        record = json.loads(owner.read_text())["bigglm_staging"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if match is None or not isinstance(record, dict) or alive(record):
        return []
    name, token = match.groups()
    old, target = owner.with_name(f".{name}.old-{token}"), owner.with_name(name)
    if old.is_dir() and not (target.exists() or target.is_symlink()):
        logger.warning("restoring %s, which a bigglm process that died was replacing", target)
        os.rename(old, target)  # it died between its two renames: the old one goes back
    removed = []
    for stem in (f".{name}.partial-{token}", f".{name}.old-{token}"):
        for path in sorted(owner.parent.glob(_glob_escape(stem) + "*")):
            logger.warning("removing %s, left by a bigglm process that died", path)
            _remove(path)
            removed.append(path)
    owner.unlink(missing_ok=True)
    return removed
