"""Group-level benchmarks: bigglm's group store and fits side by side with nilearn.

    python -m benchmarks.group                                   # everything (see below)
    python -m benchmarks.group --subjects 100 --scale            # 100 subjects, no scaling
    python -m benchmarks.group --subjects --scale 1000 2000      # the scaling sweep only
    python -m benchmarks.group --step bigglm_ols --subjects 1000 --profile   # one step

Generates the maps under ``benchmarks/data/group/`` if absent (:mod:`benchmarks.group_data`:
one effect and one variance map per subject, ``.nii.gz`` on nilearn's MNI152 2 mm mask,
235,375 voxels, 0 outside the brain), then runs each step in a fresh subprocess (wall time
and the peak resident memory of its whole process tree, Dask workers included), prints a
Markdown table of times, peaks and ratios with their targets, and writes
``benchmarks/results/<output>.json``.

The comparisons, for each number of subjects (``--subjects``) and design (``--designs``:
``onesample``, the intercept; ``twogroup``, intercept + centred age + patient indicator,
contrast ``patient``):

- ``nilearn``: ``SecondLevelModel(mask_img=<the MNI mask>, smoothing_fwhm=None)`` fitted
  on the effect maps' paths, one z contrast; ``nilearn_loaded``: the same on the images
  opened with ``nibabel.load`` first (inside the clock). nilearn 0.14 checks every *pair*
  of inputs for the same field of view, loading both from their paths for each pair, so
  with paths its time grows with the square of the subjects (most of its 9 minutes at
  1,000 subjects here); with images the pairs compare headers in memory;
- ``collect``: ``bigglm.group.collect`` of the effect and variance maps with the same mask
  (the store the fits read); ``collect_union``: the same without a mask (the maps are read
  twice: union coverage, then the write);
- ``bigglm_ols`` / ``bigglm_mixed``: ``bigglm.group.fit`` from the store + the same
  contrast, Dask's threaded scheduler (mixed is skipped, with the reason, while
  ``bigglm.group.mixed`` cannot be imported);
- ``bigglm_e2e``: what a user with the maps waits for, collect (effects only, with the
  mask, as nilearn reads them) + OLS fit + contrast, in one process;
- ``read_store``: a bare read of the store's effect array (every chunk decoded once).

bigglm's and nilearn's z maps are compared voxel by voxel (largest absolute difference).

The scaling sweep (``--scale``): OLS fit (one-sample) from stores of growing numbers of
subjects on a LocalCluster of ``--workers`` single-threaded worker processes limited to
``--memory-limit`` each (1 GB), started as ``bigglm run`` starts one, and a bare read of the
same store on the same cluster. A store of more subjects than the maps generated repeats
the maps under distinct labels (10,000 subjects: the 1,000 maps ten times; 9.4 GB of
effects plus as much of variances). By default the store's files are evicted from the page
cache before each repeat (``--scale-cache cold``): a 10,000-subject store does not fit in
this machine's memory, so every size reads from the disk alike.

Timing: each step's work is timed in-process after its imports (interpreter start-up,
the same for both tools, stays out of the ratios; the whole process is recorded too);
median of ``--repeat`` repeats (3), except nilearn at 1,000 subjects or more and the
scaling sweep, 1 repeat (``--slow-repeat``): they take minutes, and their run-to-run noise
is small against that. Before each repeat pending writes are flushed, and (warm cache) the
step's input files are read once, so that repeats read from the page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.group_data import ROOT as DATA
from benchmarks.group_data import GroupData, label, map_path, participants, write_group

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
STORES = DATA / "stores"
WORK = DATA / "work"
STEP_TIMEOUT = 3 * 3600  # seconds; a step that hangs (workers killed in a loop) fails
logger = logging.getLogger("benchmarks.group")

DESIGNS = {
    "onesample": (["intercept"], "intercept"),
    "twogroup": ("1 + age + C(group)", "patient"),
}

#: The comparisons at each number of subjects, in the order they run.
COMPARISONS = (
    "collect",
    "collect_union",
    "read_store",
    "bigglm_ols",
    "bigglm_mixed",
    "bigglm_e2e",
    "nilearn",
    "nilearn_loaded",
)
#: Steps that do not depend on the design (run once per number of subjects).
DESIGN_FREE = ("collect", "collect_union", "read_store")

Step = Callable[[argparse.Namespace], dict[str, Any]]
STEPS: dict[str, Step] = {}


def step(func: Step) -> Step:
    STEPS[func.__name__] = func
    return func


class Skipped(Exception):
    """A step that cannot run here (its reason is reported)."""


# --- data ---------------------------------------------------------------------------


def generated(n: int) -> GroupData:
    """The first ``min(n, maps on disk)`` subjects' maps (``n`` of them for the comparisons)."""
    on_disk = len(list((DATA / "maps").glob("*_stat-effect.nii.gz")))
    return GroupData(DATA, min(n, on_disk))


def maps_for(n: int) -> tuple[list[str], list[Path], list[Path]]:
    """``n`` labels and their effect and variance maps: the generated maps, repeated under
    distinct labels when ``n`` exceeds them."""
    have = generated(n).n
    if have == 0:
        raise SystemExit(f"no maps under {DATA / 'maps'}; run python -m benchmarks.group_data")
    labels = [label(k) for k in range(1, n + 1)]
    source = [label((k - 1) % have + 1) for k in range(1, n + 1)]
    return (
        labels,
        [map_path(DATA, s, "effect") for s in source],
        [map_path(DATA, s, "variance") for s in source],
    )


def store_path(n: int) -> Path:
    return STORES / f"n{n}.zarr"


def group_design(n: int, name: str) -> tuple[Any, str]:
    """bigglm's design for the first ``n`` subjects (columns renamed to identifiers, so
    that nilearn parses them too) and the contrast of the benchmark."""
    import bigglm.group

    spec, contrast = DESIGNS[name]
    table = participants(n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rank-deficient design would be a benchmark bug
        frame = bigglm.group.design(table, spec, subjects=table["participant_id"].tolist())
    renamed = {c: _identifier(c) for c in frame.columns}
    return frame.rename(columns=renamed), contrast


def _identifier(column: str) -> str:
    """``C(group)[T.patient]`` -> ``patient``; other names as they are."""
    found = re.fullmatch(r"C\(\w+\)\[T\.(\w+)\]", column)
    return found.group(1) if found else column


def store_bytes(path: Path, prefix: str = "") -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and prefix in str(p))


# --- steps (each runs in its own process: python -m benchmarks.group --step NAME) ----


def _collect(args: argparse.Namespace, target: Path, *, mask: bool, variances: bool) -> Path:
    import bigglm.group

    labels, effects, variance_maps = maps_for(args.subjects)
    return bigglm.group.collect(
        effects,
        target,
        variances=variance_maps if variances else None,
        mask=DATA / "mask.nii.gz" if mask else None,
        subjects=labels,
        overwrite=True,
        client=args.client,
    )


@step
def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Effect and variance maps -> the group store the fits read (analysis mask given)."""
    path = _collect(args, store_path(args.subjects), mask=True, variances=True)
    return {"effect_gb": store_bytes(path, "/effect/") / 1e9, "store_gb": store_bytes(path) / 1e9}


@step
def collect_union(args: argparse.Namespace) -> dict[str, Any]:
    """The same without a mask: the effect maps are read twice (coverage, then write)."""
    import bigglm.group

    target = WORK / f"union_n{args.subjects}.zarr"
    path = _collect(args, target, mask=False, variances=True)
    return {"voxels": int(bigglm.group.open_group(path).sizes["voxel"])}


@step
def read_store(args: argparse.Namespace) -> dict[str, Any]:
    """Every chunk of the effect array decoded once and reduced: the fit's read floor."""
    import bigglm.group

    effect = bigglm.group.open_group(store_path(args.subjects)).effect.data
    total = effect.sum(dtype=np.float64)
    if args.client is not None:
        value = float(args.client.compute(total).result())
    else:
        value = float(total.compute())
    return {"sum": value, "chunks": int(np.prod(effect.numblocks))}


def _fit(args: argparse.Namespace, model: str, store: Path) -> dict[str, Any]:
    import bigglm.group

    frame, contrast = group_design(args.subjects, args.design)
    result = bigglm.group.fit(store, frame, model=model, client=args.client)
    out = result.contrast(contrast)
    z = out["z"].values
    _save_z(args, z, result.dataset)
    return {"z_max": float(np.nanmax(z)), "z_min": float(np.nanmin(z))}


def _save_z(args: argparse.Namespace, z: np.ndarray, ds: Any) -> None:
    """The z map on the grid, NaN outside the store's voxels (compared with nilearn's)."""
    shape = tuple(int(n) for n in ds.attrs["volume_shape"])
    volume = np.full(shape, np.nan)
    volume[ds["i"].values, ds["j"].values, ds["k"].values] = z
    np.save(WORK / f"{args.step}_{args.design}_n{args.subjects}.npy", volume)


@step
def bigglm_ols(args: argparse.Namespace) -> dict[str, Any]:
    """OLS fit + one contrast from the group store."""
    return _fit(args, "ols", store_path(args.subjects))


def mixed_available() -> str | None:
    """None, or why bigglm's mixed-effects kernel cannot be used here."""
    try:
        found = importlib.util.find_spec("bigglm.group.mixed")
    except ImportError as err:
        return f"bigglm.group.mixed cannot be imported ({err})"
    if found is None:
        return "bigglm.group.mixed is not in this checkout (not merged yet)"
    try:
        from bigglm.group.mixed import fit_mixed  # noqa: F401
    except ImportError as err:
        return f"bigglm.group.mixed cannot be imported ({err})"
    return None


@step
def bigglm_mixed(args: argparse.Namespace) -> dict[str, Any]:
    """Mixed effects (REML, with the first-level variances) + one contrast from the store."""
    reason = mixed_available()
    if reason:
        raise Skipped(reason)
    return _fit(args, "mixed", store_path(args.subjects))


@step
def bigglm_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """From the maps: collect the effects (mask given, as nilearn is) + OLS fit + contrast."""
    target = WORK / f"e2e_n{args.subjects}.zarr"
    path = _collect(args, target, mask=True, variances=False)
    return _fit(args, "ols", path)


def _nilearn(args: argparse.Namespace, inputs: list[Any]) -> dict[str, Any]:
    import nibabel as nib
    from nilearn.glm.second_level import SecondLevelModel

    frame, contrast = group_design(args.subjects, args.design)
    model = SecondLevelModel(mask_img=str(DATA / "mask.nii.gz"), smoothing_fwhm=None)
    model.fit(inputs, design_matrix=frame.reset_index(drop=True))
    z_img = model.compute_contrast(contrast, output_type="z_score")
    z = np.asarray(z_img.dataobj, dtype=np.float64)
    z[~np.asarray(nib.load(DATA / "mask.nii.gz").dataobj).astype(bool)] = np.nan
    np.save(WORK / f"{args.step}_{args.design}_n{args.subjects}.npy", z)
    return {"z_max": float(np.nanmax(z)), "z_min": float(np.nanmin(z))}


@step
def nilearn(args: argparse.Namespace) -> dict[str, Any]:
    """nilearn SecondLevelModel on the effect maps' paths, fit + one z contrast.

    nilearn 0.14 checks that every pair of inputs has the same field of view, loading
    both headers from their paths for each pair: n (n - 1) / 2 pairs
    (``nilearn/glm/second_level/second_level.py``, ``_check_input_as_nifti_images`` ->
    ``nilearn.image.check_same_fov``), about 5 minutes at 1,000 subjects here.
    """
    _, effects, _ = maps_for(args.subjects)
    return _nilearn(args, [str(p) for p in effects])


@step
def nilearn_loaded(args: argparse.Namespace) -> dict[str, Any]:
    """The same with the images opened first (``nibabel.load``, inside the clock): the
    pairwise check then compares headers in memory instead of reloading them."""
    import nibabel as nib

    _, effects, _ = maps_for(args.subjects)
    return _nilearn(args, [nib.load(p) for p in effects])


@step
def scale_fit(args: argparse.Namespace) -> dict[str, Any]:
    """OLS (one-sample) fit + contrast from a store, on the cluster."""
    return bigglm_ols(args)


@step
def scale_read(args: argparse.Namespace) -> dict[str, Any]:
    """Bare read of the same store on the same cluster."""
    return read_store(args)


# --- the step process ----------------------------------------------------------------


def _inputs(args: argparse.Namespace) -> list[Path]:
    """The files the step reads: the maps, or the store."""
    if args.step in ("collect", "collect_union", "bigglm_e2e", "nilearn", "nilearn_loaded"):
        _, effects, variances = maps_for(args.subjects)
        uses_variances = args.step.startswith("collect")
        return sorted({*effects, *(variances if uses_variances else []), DATA / "mask.nii.gz"})
    store = store_path(args.subjects)
    skip = () if args.step == "bigglm_mixed" else (str(store / "variance" / "c"),)
    return [p for p in store.rglob("*") if p.is_file() and not str(p).startswith(skip)]


def _evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _prewarm(paths: list[Path]) -> None:
    for path in paths:
        with path.open("rb") as f:
            while f.read(2**24):
                pass


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    """A LocalCluster of ``--workers`` single-threaded processes with ``--memory-limit``
    each, started as ``bigglm run`` starts one; None (Dask's threads) without workers."""
    if not args.workers:
        yield None
        return
    from bigglm.cluster import client_from_profile
    from bigglm.config import ClusterConfig

    profile = ClusterConfig(
        n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit
    )
    with client_from_profile(profile) as client:
        yield client


def _warm_imports(args: argparse.Namespace) -> None:
    """Import what the step's tool needs before the clock starts."""
    import nibabel  # noqa: F401
    import pandas  # noqa: F401

    if args.step.startswith("nilearn"):
        import nilearn.glm.second_level  # noqa: F401
    else:  # the modules themselves: bigglm's package imports are lazy
        import dask.array  # noqa: F401
        import distributed  # noqa: F401  (dask.compute imports it when it is installed)
        import formulaic  # noqa: F401  (bigglm.group.design imports it on first use)
        import xarray  # noqa: F401
        import zarr  # noqa: F401

        import bigglm.glm.orchestration
        import bigglm.group.collection
        import bigglm.group.designs
        import bigglm.group.engine
        import bigglm.group.result  # noqa: F401


def run_step(args: argparse.Namespace) -> None:
    """One step, ``--repeat`` times, in this process; writes its JSON to WORK."""
    WORK.mkdir(parents=True, exist_ok=True)
    STORES.mkdir(parents=True, exist_ok=True)
    out_json = WORK / f"{args.step}_{args.design}_n{args.subjects}.json"
    _warm_imports(args)
    profiler = None
    if args.profile:
        import cProfile

        import dask

        dask.config.set(scheduler="synchronous")  # cProfile sees the main thread only
        profiler = cProfile.Profile()
    times, output = [], {}
    started = time.perf_counter()
    try:
        with _client(args) as client:
            args.client = client
            client_seconds = time.perf_counter() - started
            for _ in range(args.repeat):
                os.sync()  # a store written by the previous step is not still being flushed
                inputs = _inputs(args)
                _evict(inputs) if args.cache == "cold" else _prewarm(inputs)
                start = time.perf_counter()
                if profiler:
                    profiler.enable()
                output = STEPS[args.step](args)
                if profiler:
                    profiler.disable()
                times.append(time.perf_counter() - start)
    except Skipped as why:
        out_json.write_text(json.dumps({"skipped": str(why)}))
        return
    if profiler:
        _report_profile(profiler, args)
    output.update(times=times, seconds=float(np.median(times)), client_seconds=client_seconds)
    out_json.write_text(json.dumps(output))


def _report_profile(profiler: Any, args: argparse.Namespace) -> None:
    import io
    import pstats

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = RESULTS / f"profile_{args.step}_{args.design}_n{args.subjects}"
    profiler.dump_stats(f"{name}.prof")
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(25)
    Path(f"{name}.txt").write_text(text.getvalue())
    print(text.getvalue())


# --- the driver ----------------------------------------------------------------------


@dataclass
class Measurement:
    step: str
    design: str
    subjects: int
    workers: int = 0
    cache: str = "warm"
    seconds: float = float("nan")  # the step's work, median of the repeats
    times: list[float] = field(default_factory=list)
    wall: float = 0.0  # the whole process, start-up (and cluster start) included
    peak_rss_gib: float = 0.0  # the whole process tree
    peak_process_gib: float = 0.0  # the largest single process
    peak_worker_gib: float = 0.0  # the largest descendant (a Dask worker), 0 without
    skipped: str | None = None
    output: dict[str, Any] = field(default_factory=dict)


def measure(name: str, subjects: int, design: str = "-", **options: Any) -> Measurement:
    """Run one step in a subprocess; sample its process tree's memory every 20 ms."""
    from benchmarks.run import run_sampled

    opts = {"workers": 0, "memory_limit": "1GB", "repeat": 1, "cache": "warm", **options}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.group",
        "--step",
        name,
        "--subjects",
        str(subjects),
        "--design",
        design,
        "--workers",
        str(opts["workers"]),
        "--memory-limit",
        opts["memory_limit"],
        "--repeat",
        str(opts["repeat"]),
        "--cache",
        opts["cache"],
    ]
    result = Measurement(name, design, subjects, opts["workers"], opts["cache"])
    code, result.wall, peaks = run_sampled(cmd, name, cwd=REPO, timeout=STEP_TIMEOUT)
    if code != 0:
        raise SystemExit(f"benchmark step {name} ({subjects} subjects) failed, status {code}")
    result.peak_rss_gib, result.peak_process_gib, result.peak_worker_gib = (
        p / 2**30 for p in peaks
    )
    result.output = json.loads((WORK / f"{name}_{design}_n{subjects}.json").read_text())
    if "skipped" in result.output:
        result.skipped = result.output["skipped"]
        logger.info("%-14s %-9s n=%-6d skipped: %s", name, design, subjects, result.skipped)
        return result
    result.seconds = result.output.pop("seconds")
    result.times = result.output.pop("times")
    logger.info(
        "%-14s %-9s n=%-6d w%d %s %8.2f s (process %.1f s)  peak %.2f GiB (worker %.2f)",
        name,
        design,
        subjects,
        result.workers,
        result.cache,
        result.seconds,
        result.wall,
        result.peak_rss_gib,
        result.peak_worker_gib,
    )
    return result


def comparisons(
    subjects: list[int], designs: list[str], steps: list[str], repeat: int, slow_repeat: int
) -> list[Measurement]:
    rows = []
    for n in subjects:
        ordered = [s for s in COMPARISONS if s in steps]
        if "collect" not in ordered and not (store_path(n) / "zarr.json").exists():
            ordered.insert(0, "collect")  # the fits need the store
        for name in ordered:
            reps = slow_repeat if name.startswith("nilearn") and n >= 1000 else repeat
            for design in ["-"] if name in DESIGN_FREE else designs:
                rows.append(measure(name, n, design, repeat=reps))
        for scratch in WORK.glob("*.zarr"):  # the e2e and union stores
            shutil.rmtree(scratch)
    return rows


def scaling(
    sizes: list[int], workers: int, memory_limit: str, repeat: int, cache: str
) -> list[Measurement]:
    rows = []
    for n in sizes:
        if not (store_path(n) / "zarr.json").exists():
            rows.append(measure("collect", n, "-"))
        for name in ("scale_read", "scale_fit"):
            design = "onesample" if name == "scale_fit" else "-"
            row = measure(
                name,
                n,
                design,
                workers=workers,
                memory_limit=memory_limit,
                repeat=repeat,
                cache=cache,
            )
            row.output["store_gb"] = store_bytes(store_path(n)) / 1e9
            row.output["effect_gb"] = store_bytes(store_path(n), "/effect/") / 1e9
            rows.append(row)
    return rows


def agreement(subjects: list[int], designs: list[str]) -> list[dict[str, Any]]:
    """bigglm's z against nilearn's, voxel by voxel, where both were computed."""
    rows = []
    for n, design, reference in itertools.product(subjects, designs, ("nilearn", "nilearn_loaded")):
        paths = [WORK / f"{tool}_{design}_n{n}.npy" for tool in ("bigglm_ols", reference)]
        if not all(p.exists() for p in paths):
            continue
        ours, theirs = (np.load(p) for p in paths)
        both = np.isfinite(ours) & np.isfinite(theirs)
        rows.append(
            {
                "reference": reference,
                "subjects": n,
                "design": design,
                "voxels_compared": int(both.sum()),
                "finite_only_in_one": int((np.isfinite(ours) ^ np.isfinite(theirs)).sum()),
                "z_max_abs_diff": float(np.abs(ours[both] - theirs[both]).max()),
                "z_correlation": float(np.corrcoef(ours[both], theirs[both])[0, 1]),
            }
        )
    return rows


#: (label, numerator step, denominator step, target, design of the denominator or None)
RATIOS = (
    ("nilearn / bigglm OLS fit (from the store)", "nilearn", "bigglm_ols", ">= 100"),
    ("nilearn / bigglm end to end (collect + fit)", "nilearn", "bigglm_e2e", ">= 5"),
    ("nilearn, images loaded / bigglm OLS fit", "nilearn_loaded", "bigglm_ols", ">= 100"),
    ("nilearn, images loaded / bigglm end to end", "nilearn_loaded", "bigglm_e2e", ">= 5"),
    ("bigglm mixed / bigglm OLS", "bigglm_mixed", "bigglm_ols", "<= 3"),
    ("bigglm OLS fit / bare store read (threads)", "bigglm_ols", "read_store", "-"),
    ("collect without / with a mask", "collect_union", "collect", "-"),
)


def _meets(value: float, target: str) -> str:
    if target == "-" or not np.isfinite(value):
        return ""
    op, bound = target.split()
    return "met" if (value >= float(bound) if op == ">=" else value <= float(bound)) else "MISSED"


def ratio_table(rows: list[Measurement]) -> list[dict[str, Any]]:
    found = {(m.step, m.design, m.subjects, m.workers): m for m in rows if not m.skipped}
    out = []
    for n in sorted({m.subjects for m in rows if m.workers == 0}):
        for design in sorted({m.design for m in rows if m.design != "-"}):
            for label_, top, bottom, target in RATIOS:
                a = found.get((top, design if top not in DESIGN_FREE else "-", n, 0))
                b = found.get((bottom, design if bottom not in DESIGN_FREE else "-", n, 0))
                if a is None or b is None:
                    continue
                if top in DESIGN_FREE and bottom in DESIGN_FREE and design != "onesample":
                    continue  # design-free ratios once
                value = a.seconds / b.seconds
                out.append(_ratio_row(label_, n, design, value, target))
    out += _scaling_ratios(rows)
    return out


def _ratio_row(label_: str, n: int | str, design: str, value: float, target: str) -> dict:
    return {
        "ratio": label_,
        "subjects": n,
        "design": design,
        "value": round(value, 3),
        "target": target,
        "verdict": _meets(value, target),
    }


def _scaling_ratios(rows: list[Measurement]) -> list[dict[str, Any]]:
    fits = {m.subjects: m for m in rows if m.step == "scale_fit" and not m.skipped}
    reads = {m.subjects: m for m in rows if m.step == "scale_read" and not m.skipped}
    out = [
        _ratio_row(
            "scale: OLS fit / bare read, same cluster",
            n,
            "onesample",
            fits[n].seconds / reads[n].seconds,
            "<= 2",
        )
        for n in sorted(fits)
        if n in reads
    ]
    if len(fits) >= 2:
        small, large = min(fits), max(fits)
        per_subject = (fits[large].seconds / large) / (fits[small].seconds / small)
        span = f"{small} -> {large}"
        out.append(
            _ratio_row(
                "scale: fit time per subject, large / small",
                span,
                "onesample",
                per_subject,
                "<= 1.2",
            )
        )
        memory = fits[large].peak_worker_gib / fits[small].peak_worker_gib
        out.append(
            _ratio_row("scale: peak worker RSS, large / small", span, "onesample", memory, "<= 1.2")
        )
    return out


def markdown(
    rows: list[Measurement], ratios: list[dict[str, Any]], agree: list[dict[str, Any]]
) -> str:
    lines = [
        "| step | design | subjects | workers | cache | work (s) | repeats (s) | process (s) "
        "| peak RSS, tree (GiB) | largest worker (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        workers = m.workers or "threads"
        if m.skipped:
            lines.append(
                f"| {m.step} | {m.design} | {m.subjects} | {workers} | | skipped: "
                f"{m.skipped} | | | | |"
            )
            continue
        repeats = " / ".join(f"{t:.2f}" for t in m.times)
        lines.append(
            f"| {m.step} | {m.design} | {m.subjects} | {workers} | {m.cache} | {m.seconds:.2f} "
            f"| {repeats} | {m.wall:.1f} | {m.peak_rss_gib:.2f} | {m.peak_worker_gib:.2f} |"
        )
    lines.append(
        "(work: median of the repeats, timed after imports; process: the whole "
        "subprocess, interpreter and cluster start included)"
    )
    lines += [
        "",
        "| ratio (work time) | subjects | design | measured | target | |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['ratio']} | {r['subjects']} | {r['design']} | {r['value']} | {r['target']} "
        f"| {r['verdict']} |"
        for r in ratios
    ]
    if agree:
        lines += [
            "",
            "| z, bigglm OLS vs | subjects | design | voxels | max abs diff | correlation |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {a['reference']} | {a['subjects']} | {a['design']} | {a['voxels_compared']} "
            f"| {a['z_max_abs_diff']:.3g} | {a['z_correlation']:.9f} |"
            for a in agree
        ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--subjects",
        type=int,
        nargs="*",
        default=[100, 1000],
        help="numbers of subjects of the comparisons (none: skip them)",
    )
    parser.add_argument(
        "--designs", nargs="*", choices=sorted(DESIGNS), default=["onesample", "twogroup"]
    )
    parser.add_argument(
        "--steps",
        nargs="*",
        default=list(COMPARISONS),
        choices=COMPARISONS,
        help="which comparisons to run",
    )
    parser.add_argument(
        "--scale",
        type=int,
        nargs="*",
        default=[1000, 10000],
        help="numbers of subjects of the scaling sweep (none: skip it)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers of the scaling sweep (2; with --step: 0, Dask's threads)",
    )
    parser.add_argument("--memory-limit", default="1GB", help="per worker, scaling sweep")
    parser.add_argument("--scale-cache", choices=["warm", "cold"], default="cold")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of the fast steps")
    parser.add_argument(
        "--slow-repeat",
        type=int,
        default=1,
        help="repeats of nilearn at >= 1000 subjects and of the scaling sweep",
    )
    parser.add_argument("--output", default="group", help="name of the JSON in benchmarks/results")
    # one step in this process (what the driver runs in each subprocess)
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--design", default="-", help=argparse.SUPPRESS)
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --step: run it under cProfile (synchronous Dask scheduler)",
    )
    args = parser.parse_args(argv)
    return args


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.step:
        logging.getLogger("distributed").setLevel(logging.WARNING)  # the cluster's chatter
        (args.subjects,) = args.subjects
        args.workers = args.workers or 0
        if args.design == "-" and args.step not in (*DESIGN_FREE, "scale_read"):
            args.design = "onesample"
        run_step(args)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = write_group(max([*args.subjects, min(max(args.scale, default=1), 1000)]))
    generation = time.perf_counter() - start
    if data.n and generation > 1:
        logger.info("maps ready in %.1f s (%.2f GB)", generation, data.nbytes() / 1e9)
    why_not_mixed = mixed_available()
    if why_not_mixed and "bigglm_mixed" in args.steps:
        logger.warning("mixed effects skipped: %s", why_not_mixed)
    rows = comparisons(args.subjects, args.designs, args.steps, args.repeat, args.slow_repeat)
    workers = 2 if args.workers is None else args.workers
    rows += scaling(args.scale, workers, args.memory_limit, args.slow_repeat, args.scale_cache)
    ratios = ratio_table(rows)
    agree = agreement(args.subjects, args.designs)
    from benchmarks.run import machine

    report = {
        "machine": machine(),
        "data": {"voxels": 235_375, "maps": data.n, "maps_gb": data.nbytes() / 1e9},
        "mixed": why_not_mixed or "available",
        "measurements": [m.__dict__ for m in rows],
        "ratios": ratios,
        "agreement": agree,
    }
    (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=2))
    print(markdown(rows, ratios, agree))
    print(f"\nwrote {RESULTS / args.output}.json (data in {DATA})")


if __name__ == "__main__":
    main()
