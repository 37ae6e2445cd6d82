"""The on-screen summary of an analysis: what ran, what was reused, and where the maps are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_summary"]


def format_summary(outcomes: Sequence[Any]) -> str:
    """A few lines per unit: runs, volumes, steps (ran or reused, seconds), peaks, outputs.

    Parameters
    ----------
    outcomes : sequence of bigglm.pipeline.UnitOutcome
        What :func:`bigglm.pipeline.run_analysis` returned.

    Returns
    -------
    str
        Plain text, ready for the terminal.

    Examples
    --------
    >>> from pathlib import Path
    >>> from bigglm.pipeline import UnitOutcome
    >>> o = UnitOutcome("sub-01_task-a", 1, 100, 5000,
    ...                 steps={"fit": {"status": "ran", "seconds": 2.5}},
    ...                 maps=[Path("/o/sub-01/m.nii.gz")], peaks={"a": 7.25},
    ...                 provenance=Path("/o/sub-01/p.json"))
    >>> print(format_summary([o]))
    sub-01_task-a: 1 run, 100 volumes, 5000 voxels
      steps: fit ran (2.5 s)
      peak |z|: a 7.25
      1 maps in /o/sub-01; provenance /o/sub-01/p.json
    """
    lines: list[str] = []
    for o in outcomes:
        if not hasattr(o, "n_runs"):  # the group level's outcome
            lines.append(f"group: {o.subjects} subjects")
            lines.append(f"  steps: {_steps(o.steps)}")
            folders = sorted({str(p.parent) for p in o.maps})
            counts = f"{len(o.maps)} maps, {len(o.tables)} cluster tables"
            lines.append(f"  {counts} in {', '.join(folders)}")
            continue
        runs = f"{o.n_runs} run" + ("s" if o.n_runs != 1 else "")
        lines.append(f"{o.name}: {runs}, {o.n_volumes} volumes, {o.n_voxels} voxels")
        lines.append(f"  steps: {_steps(o.steps)}")
        if o.peaks:
            lines.append("  peak |z|: " + ", ".join(f"{k} {v:.2f}" for k, v in o.peaks.items()))
        folder = o.maps[0].parent if o.maps else None
        lines.append(f"  {len(o.maps)} maps in {folder}; provenance {o.provenance}")
        if getattr(o, "report", None) is not None:
            lines.append(f"  report {o.report}")
    return "\n".join(lines)


def _steps(steps: dict[str, Any]) -> str:
    return ", ".join(
        f"{name} {info['status']} ({info['seconds']:.1f} s)"
        if info["status"] == "ran"
        else f"{name} reused"
        for name, info in steps.items()
    )
