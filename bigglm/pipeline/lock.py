"""Who may write an outputs folder: one analysis owns it, one run writes a unit at a time."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bigglm.exceptions import StoreError
from bigglm.io.locks import Busy, exclusive, read_record
from bigglm.pipeline.plan import STATE, state_folder

__all__ = ["analysis_identity", "claim_outputs", "lock_units"]

#: The record, in the state folder, of the analysis that owns an outputs folder.
OWNER = "analysis.json"

logger = logging.getLogger(__name__)


@contextmanager
def lock_units(outputs: str | Path, units: Sequence[str]) -> Iterator[None]:
    """Hold one lock file per unit in ``outputs`` for the duration of the block.

    A lock is an ``flock`` on ``<outputs>/.bigglm/locks/<unit>.lock``
    (:func:`bigglm.io.locks.exclusive`): the kernel grants it to one process at a time
    and frees it when its process dies, so a killed run's lock is free at once and two
    runs started together never both hold it. The file records the holder's host, PID
    and start time for the error message.

    Parameters
    ----------
    outputs : str or Path
        The analysis output folder.
    units : sequence of str
        Unit names to lock (taken in sorted order, released on exit).

    Raises
    ------
    StoreError
        If another live process holds one of the locks.

    Examples
    --------
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> with lock_units(out, ["sub-01"]):
    ...     with lock_units(out, ["sub-01"]):
    ...         pass
    Traceback (most recent call last):
    ...
    bigglm.exceptions.StoreError: ...sub-01 is being written by another bigglm run (PID ...
    """
    folder = state_folder(outputs) / "locks"
    folder.mkdir(exist_ok=True)
    with ExitStack() as stack:
        for unit in sorted(set(units)):
            stack.enter_context(_lock_file(folder / f"{unit}.lock", Path(outputs), unit))
        yield


@contextmanager
def _lock_file(path: Path, outputs: Path, unit: str) -> Iterator[None]:
    """Hold ``path`` with :func:`bigglm.io.locks.exclusive`: atomic, and a dead holder's
    lock is free by construction (the kernel released it), so there is no takeover."""
    try:
        with exclusive(path, wait=False):
            yield
    except Busy as busy:
        holder = busy.holder or {}
        raise StoreError(
            f"{outputs}: {unit} is being written by another bigglm run (PID "
            f"{holder.get('pid')} on {holder.get('host')}, since "
            f"{holder.get('since')}); wait for it to finish or use another "
            "outputs.folder"
        ) from None


def analysis_identity(config: Any) -> str:
    """What makes two runs the same analysis: the YAML file it was read from.

    A configuration built in Python (no file) is identified by its ``inputs`` section, so
    a rerun with other model options or contrasts is the same analysis, and one over
    other data is another.

    Examples
    --------
    >>> from bigglm.config import parse_config
    >>> cfg = parse_config({"inputs": {"runs": [{"bold": "/b.nii"}]}, "outputs": {"folder": "/o"}})
    >>> analysis_identity(cfg).startswith("inputs sha256:")
    True
    """
    if getattr(config, "source", None) is not None:
        return f"config {config.source}"
    inputs = json.dumps(config.inputs.model_dump(mode="json"), sort_keys=True)
    return f"inputs sha256:{hashlib.sha256(inputs.encode()).hexdigest()}"


def claim_outputs(
    outputs: str | Path, identity: str, folders: Sequence[Path], *, overwrite: bool
) -> None:
    """Make ``outputs`` this analysis's folder, refusing one that holds another's outputs.

    The owner is recorded in ``<outputs>/.bigglm/analysis.json`` on the first run. A later
    run of the same analysis (same ``identity``) resumes there; a run of another analysis
    is refused unless ``overwrite``, and then owns the folder. A folder without that
    record but with the state of an earlier bigglm version is adopted; one without any
    state whose unit folders (``folders``) already hold bigglm outputs (copied there, or
    written by ``bigglm fit``) holds another analysis's outputs.

    Parameters
    ----------
    outputs : str or Path
        The analysis output folder.
    identity : str
        :func:`analysis_identity` of the configuration.
    folders : sequence of Path
        The unit folders this run writes in.
    overwrite : bool
        Take the folder over from another analysis (its outputs are replaced as this
        analysis writes its own; files bigglm did not write are still never replaced).

    Raises
    ------
    StoreError
        If the folder belongs to another analysis and ``overwrite`` is False.

    Examples
    --------
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> claim_outputs(out, "config /a.yaml", [], overwrite=False)
    >>> claim_outputs(out, "config /b.yaml", [], overwrite=False)
    Traceback (most recent call last):
    ...
    bigglm.exceptions.StoreError: ...holds the outputs of another analysis (config /a.yaml...
    """
    outputs = Path(outputs)
    state = state_folder(outputs)
    record = state / OWNER
    with exclusive(state / f"{OWNER}.lock"):
        owner = read_record(record)
        if owner is None and not overwrite:
            _refuse_unowned_outputs(outputs, folders)
        elif owner is not None and owner.get("analysis") != identity and not overwrite:
            raise StoreError(
                f"{outputs}: holds the outputs of another analysis ({owner.get('analysis')}, "
                f"since {owner.get('since')}); choose another outputs folder, or pass "
                "overwrite=True to replace its outputs with this analysis's"
            )
        if owner is None or owner.get("analysis") != identity:
            from bigglm.report.provenance import write_json_atomic

            since = datetime.now(UTC).isoformat(timespec="seconds")
            write_json_atomic(record, {"analysis": identity, "since": since})


def _refuse_unowned_outputs(outputs: Path, folders: Sequence[Path]) -> None:
    """No owner recorded: adopt a folder with an earlier version's state (its step
    records), refuse one whose unit folders hold bigglm outputs without any state."""
    from bigglm.io.artefacts import kind_of

    if (outputs / STATE / "steps").is_dir():
        return
    for folder in folders:
        found = [p for p in folder.iterdir() if kind_of(p)] if folder.is_dir() else []
        if found:
            raise StoreError(
                f"{outputs}: {found[0]} holds outputs of another analysis (this folder has "
                "no record of the analysis that wrote them); choose another outputs folder, "
                "or pass overwrite=True to replace them"
            )
