"""Run every benchmark side by side and report ratios.

    python -m benchmarks.run                      # 1x comparisons, longer runs and more runs
    python -m benchmarks.run --scales 1 4         # a quicker scaling sweep

Generates the data under benchmarks/data/ if absent, runs each step in a fresh subprocess
(wall time and peak resident memory of its whole process tree, workers included), prints a
Markdown table, and writes benchmarks/results/results.json and results.png (``--output``
names them otherwise).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.datasets import DATA, Spec, write_run

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("benchmarks")
STEP_TIMEOUT = 1800  # seconds; a step that hangs (e.g. workers killed in a loop) fails

#: The side-by-side comparisons on the 1x run, in the order they run.
COMPARISONS = (
    "read_nii",
    "read_niigz_raw",
    "read_niigz_nibabel",
    "convert_nii",
    "convert_niigz",
    "read_store",
    "bigglm_ols",
    "bigglm_ar1",
    "bigglm_spm_ar1",
    "bigglm_film",
    "bigglm_ols_memory",
    "bigglm_ar1_memory",
    "nilearn_ols",
    "nilearn_ar1",
    "bigglm_e2e_ols",
    "bigglm_e2e_ar1",
)

#: (label, numerator step, denominator step, target): ratios of wall times.
RATIOS = (
    ("convert .nii / nibabel read .nii", "convert_nii", "read_nii", "<= 1.5"),
    ("convert .nii.gz / ISA-L decompression", "convert_niigz", "read_niigz_raw", "<= 1.5"),
    ("nilearn OLS / bigglm OLS (from store)", "nilearn_ols", "bigglm_ols", ">= 10"),
    ("nilearn AR(1) / bigglm AR(1) (from store)", "nilearn_ar1", "bigglm_ar1", ">= 20"),
    ("nilearn OLS / bigglm OLS end to end (.nii.gz)", "nilearn_ols", "bigglm_e2e_ols", ">= 3"),
    ("nilearn AR(1) / bigglm AR(1) end to end", "nilearn_ar1", "bigglm_e2e_ar1", "-"),
    ("bigglm OLS / bare store read", "bigglm_ols", "read_store", "<= 2"),
    ("bigglm AR(1) / bare store read", "bigglm_ar1", "read_store", "<= 2"),
    ("bigglm SPM AR(0.2) / bigglm OLS (from store)", "bigglm_spm_ar1", "bigglm_ols", "<= 2.5"),
    ("bigglm FSL FILM / bigglm OLS (from store)", "bigglm_film", "bigglm_ols", "<= 3"),
    ("bigglm OLS, data in memory / bare store read", "bigglm_ols_memory", "read_store", "-"),
    ("bigglm AR(1), data in memory / bare store read", "bigglm_ar1_memory", "read_store", "-"),
)


@dataclass
class Measurement:
    step: str
    scale: int
    workers: int
    cache: str = "warm"  # "cold": inputs evicted from the page cache before each repeat
    seconds: float = 0.0  # the step's work, timed in-process after imports (median of repeats)
    times: list[float] = field(default_factory=list)  # every repeat
    wall: float = 0.0  # the whole process, start-up included
    peak_rss_gib: float = 0.0
    peak_process_gib: float = 0.0
    peak_worker_gib: float = 0.0  # largest child process (a Dask worker), 0 without workers
    output: dict[str, Any] = field(default_factory=dict)


def _tree_rss(proc: psutil.Process) -> tuple[int, int, int]:
    """Total RSS of a process and its descendants, the largest single one, and the largest
    descendant (with worker processes: the largest Dask worker or nanny)."""
    sizes = []
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # the step just ended
        return 0, 0, 0
    for p in family:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return sum(sizes), max(sizes, default=0), max(sizes[1:], default=0)


def run_sampled(
    cmd: list[str], name: str, *, cwd: Path, timeout: float
) -> tuple[int, float, tuple[int, int, int]]:
    """Run a step's command; its exit status, wall time and peak memory (every 20 ms).

    The peaks are those of :func:`_tree_rss`: the whole process tree, its largest
    process, its largest descendant. A step running past ``timeout`` is killed.
    """
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=cwd)
    proc = psutil.Process(child.pid)
    peaks = [0, 0, 0]

    def sample() -> None:
        while child.poll() is None:
            for i, size in enumerate(_tree_rss(proc)):
                peaks[i] = max(peaks[i], size)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [proc, *proc.children(recursive=True)]:
            p.kill()
        raise SystemExit(f"benchmark step {name} took over {timeout} s; stopped") from None
    wall = time.perf_counter() - start
    sampler.join()
    return code, wall, (peaks[0], peaks[1], peaks[2])


def measure(
    name: str,
    run_dir: Path,
    work: Path,
    scale: int,
    workers: int = 0,
    memory_limit: str = "auto",
    n_runs: int = 1,
    repeat: int = 1,
    cold: bool = False,
    malloc: str = "bigglm",
) -> Measurement:
    """Run one step in a subprocess; sample its process tree's memory every 20 ms."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.steps",
        name,
        str(run_dir),
        str(work),
        "--workers",
        str(workers),
        "--memory-limit",
        memory_limit,
        "--n-runs",
        str(n_runs),
        "--repeat",
        str(repeat),
        *(["--cold"] if cold else []),
        "--malloc",
        malloc,
    ]
    result = Measurement(name, scale, workers, cache="cold" if cold else "warm")
    code, result.wall, peaks = run_sampled(cmd, name, cwd=ROOT, timeout=STEP_TIMEOUT)
    if code != 0:
        raise SystemExit(f"benchmark step {name} failed with exit status {code}")
    result.peak_rss_gib, result.peak_process_gib, result.peak_worker_gib = (
        p / 2**30 for p in peaks
    )
    result.output = json.loads((work / f"{name}.json").read_text())
    result.seconds = result.output.pop("seconds")
    result.times = result.output.pop("times")
    logger.info(
        "%-20s x%-3d w%d %s %8.2f s (process %.1f s)  peak %.2f GiB (largest %.2f, worker %.2f)",
        name,
        scale,
        workers,
        result.cache,
        result.seconds,
        result.wall,
        result.peak_rss_gib,
        result.peak_process_gib,
        result.peak_worker_gib,
    )
    return result


def agreement(work: Path) -> dict[str, float]:
    """How closely bigglm's z maps match nilearn's on the same data and design."""
    out = {}
    for noise in ("ols", "ar1"):
        ours, theirs = (np.load(work / f"{tool}_{noise}.npy") for tool in ("bigglm", "nilearn"))
        out[f"{noise}_z_correlation"] = float(np.corrcoef(ours, theirs)[0, 1])
        out[f"{noise}_z_max_abs_diff"] = float(np.nanmax(np.abs(ours - theirs)))
    return out


def scaling(
    scales: list[int], workers: list[int], memory_limit: str, malloc: str = "bigglm"
) -> list[Measurement]:
    """Fit from the store at growing sizes and worker counts, one worker memory limit."""
    rows = []
    for scale in scales:
        spec = Spec(n_volumes=400 * scale)
        run = write_run(spec, compressed=scale == 1)
        work = RESULTS / "work" / spec.name
        rows.append(measure("convert_nii", run.nii.parent, work, scale))
        for n in workers:
            row = measure("bigglm_ols", run.nii.parent, work, scale, n, memory_limit, malloc=malloc)
            rows.append(row)
        if scale > 1:  # the 16x NIfTI files alone are ~28 GB each; keep only the store
            shutil.rmtree(run.nii.parent)
    return rows


def run_scaling(
    counts: list[int], workers: list[int], memory_limit: str, malloc: str = "bigglm"
) -> list[Measurement]:
    """One subject with 1, 4, 16 runs (fixed design, seeds 0..n-1) fitted together."""
    rows = []
    first = DATA / Spec().name
    work = RESULTS / "work" / Spec().name
    for n in counts:
        extra = [Spec(seed=k) for k in range(1, n)]
        for spec in extra:
            if not (RESULTS / "work" / spec.name / f"{spec.name}.zarr" / "zarr.json").exists():
                write_run(spec, compressed=False)
        rows.append(measure("convert_runs", first, work, n, n_runs=n))
        for spec in extra:  # 1.76 GB of NIfTI per run; the stores are what the fits read
            shutil.rmtree(DATA / spec.name, ignore_errors=True)
        for w in workers:
            fit = measure(
                "bigglm_runs_ols", first, work, n, w, memory_limit, n_runs=n, malloc=malloc
            )
            rows.append(fit)
    return rows


#: Steps that take tens of seconds: their run-to-run noise is small next to their time.
SLOW_STEPS = ("nilearn_ols", "nilearn_ar1", "read_niigz_nibabel")


def _repeats(step: str, wanted: int) -> int:
    return min(wanted, 3) if step in SLOW_STEPS else wanted


def ratio_table(by_step: dict[tuple[str, str], Measurement]) -> list[dict[str, str | float]]:
    """The RATIOS, for each page-cache state that has both steps."""
    rows: list[dict[str, str | float]] = []
    for cache in ("warm", "cold"):
        for label, top, bottom, target in RATIOS:
            if (top, cache) in by_step and (bottom, cache) in by_step:
                value = by_step[top, cache].seconds / by_step[bottom, cache].seconds
                rows.append(
                    {"ratio": label, "cache": cache, "value": round(value, 2), "target": target}
                )
    return rows


def markdown(
    measured: list[Measurement], ratios: list[dict[str, str | float]], agree: dict[str, float]
) -> str:
    lines = [
        "| step | size | workers | cache | work (s) | repeats (s) | process (s) | peak RSS "
        "| largest proc. | worker |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        workers = m.workers or "default"
        repeats = " / ".join(f"{t:.2f}" for t in m.times)
        lines.append(
            f"| {m.step} | {m.scale}x | {workers} | {m.cache} | {m.seconds:.2f} | {repeats} | "
            f"{m.wall:.1f} | {m.peak_rss_gib:.2f} | {m.peak_process_gib:.2f} | "
            f"{m.peak_worker_gib:.2f} |"
        )
    lines.append(
        "(work: median of the repeats; memory in GiB; worker: the largest Dask worker "
        "process, when there are any)"
    )
    lines += ["", "| ratio | page cache | measured | target |", "|---|---|---|---|"]
    lines += [f"| {r['ratio']} | {r['cache']} | {r['value']} | {r['target']} |" for r in ratios]
    if agree:
        lines += ["", "| agreement with nilearn (z maps) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in agree.items()]
    return "\n".join(lines)


def plot(measured: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.5))
    ones = [m for m in measured if m.scale == 1 and m.workers == 0 and m.step in COMPARISONS]
    left.barh([f"{m.step} ({m.cache})" for m in ones], [m.seconds for m in ones], color="tab:blue")
    left.set(xlabel="work time (s), 1x run", xscale="log")
    left.invert_yaxis()
    kinds = {"bigglm_ols": "longer run", "bigglm_runs_ols": "more runs"}
    for (step, kind), n in itertools.product(kinds.items(), (1, 2, 4, 8)):
        fits = sorted(
            (m for m in measured if m.step == step and m.workers == n), key=lambda m: m.scale
        )
        if not fits:
            continue
        label = f"{kind}, {n} worker(s)"
        mid.plot([m.scale for m in fits], [m.seconds for m in fits], "o-", label=label)
        right.plot([m.scale for m in fits], [m.peak_worker_gib for m in fits], "o-", label=label)
    mid.set(
        xlabel="data size (x the 1x run)", ylabel="OLS fit time (s)", xscale="log", yscale="log"
    )
    right.set(
        xlabel="data size (x the 1x run)",
        ylabel="peak RSS of the largest worker (GiB)",
        xscale="log",
    )
    for ax in (left, mid, right):
        if ax.lines:
            ax.legend()
        elif not ax.patches:
            ax.set_axis_off()  # this part was not run
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine() -> dict[str, str | int | float]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count() or 0,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "processor": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--runs", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument(
        "--memory-limit", default="512MiB", help="per-worker memory limit in the scaling sweep"
    )
    parser.add_argument(
        "--malloc",
        choices=["bigglm", "distributed"],
        default="bigglm",
        help="worker malloc settings in the scaling sweeps: bigglm's or distributed's own",
    )
    parser.add_argument(
        "--output", default="results", help="name of the JSON and PNG files in benchmarks/results"
    )
    parser.add_argument(
        "--steps", nargs="*", default=list(COMPARISONS), help="which 1x comparisons to run"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=7,
        help="repeats of each 1x comparison (median reported); at most 3 for the slow steps",
    )
    parser.add_argument(
        "--cache",
        nargs="*",
        choices=["warm", "cold"],
        default=["warm", "cold"],
        help="page-cache states of the 1x comparisons (cold: inputs evicted before each repeat)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    run = write_run(Spec())
    work = RESULTS / "work" / Spec().name
    measured = [
        measure(name, run.nii.parent, work, 1, repeat=_repeats(name, args.repeat), cold=cold)
        for cold in (cache == "cold" for cache in args.cache)
        for name in args.steps
    ]
    by_step = {(m.step, m.cache): m for m in measured}
    steps_run = {m.step for m in measured}
    agree = agreement(work) if {"nilearn_ar1", "bigglm_ar1", "nilearn_ols"} <= steps_run else {}
    measured += scaling(args.scales, args.workers, args.memory_limit, args.malloc)
    measured += run_scaling(args.runs, args.workers, args.memory_limit, args.malloc)
    ratios = ratio_table(by_step)
    report = {
        "machine": machine(),
        "worker_malloc": args.malloc,
        "data": {"voxels": 235_375, "volumes": Spec().n_volumes, "tr": Spec().tr},
        "measurements": [m.__dict__ for m in measured],
        "ratios": ratios,
        "agreement": agree,
    }
    (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=2))
    plot(measured, RESULTS / f"{args.output}.png")
    print(markdown(measured, ratios, agree))
    print(f"\nwrote {RESULTS / args.output}.json and .png (data in {DATA})")


if __name__ == "__main__":
    main()
