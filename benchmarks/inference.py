"""Permutation-inference benchmarks: bigglm.inference side by side with nilearn.

    python -m benchmarks.inference                       # everything below
    python -m benchmarks.inference --parts nilearn       # the nilearn comparisons only
    python -m benchmarks.inference --parts cohort        # the cohort-scale run and its floor
    python -m benchmarks.inference --step bigglm_maxt --subjects 100 --n-perm 1000

Data: the group benchmark's maps (:mod:`benchmarks.group_data`, one-sample effects on
nilearn's MNI152 2 mm mask, 235,375 voxels) and its group stores (built here with
``bigglm.group.collect`` when absent; not timed).

- ``nilearn_*``: ``non_parametric_inference`` on the first ``--subjects`` effect maps with
  the MNI mask, intercept design, ``n_jobs=2``: voxel max-T (``nilearn_maxt``), TFCE
  (``nilearn_tfce``), cluster extent and mass at p < 0.001 (``nilearn_cluster``).
- ``bigglm_*``: ``bigglm.inference.permutation_test`` from the group store of the same
  maps, the same options (cluster threshold converted to t as nilearn does), Dask's
  threaded scheduler.
- ``cohort``: 10,000 subjects x 235,375 voxels x 10,000 sign flips, voxel max-T, on a
  LocalCluster of 2 single-threaded workers limited to 2 GB each, ``precision="single"``
  (the comparisons with nilearn use the default, double); ``floor``: the same
  matrix products alone (float32, ``(batch x subjects) @ (subjects x 8192 voxels)`` for
  every batch and voxel block, on data in memory, numpy's BLAS on both cores).

nilearn's TFCE and cluster runs are measured at fewer rearrangements (``--nilearn-perm``)
and compared per rearrangement (their cost is linear in the rearrangements), and so
reported. Each step runs in a fresh subprocess (wall time and peak memory of its process
tree, workers included); the table goes to stdout and ``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.group import DATA, REPO, RESULTS, WORK, maps_for, store_path

logger = logging.getLogger("benchmarks.inference")
STEP_TIMEOUT = 3 * 3600
CLUSTER_P = 0.001


# --- steps (each in its own process) --------------------------------------------------


def _design(n: int) -> Any:
    import pandas as pd

    labels, _, _ = maps_for(n)
    return pd.DataFrame({"intercept": 1.0}, index=labels)


def _ensure_store(n: int) -> Path:
    import bigglm.group

    target = store_path(n)
    if not (target / "zarr.json").exists():
        labels, effects, _ = maps_for(n)
        target.parent.mkdir(parents=True, exist_ok=True)
        bigglm.group.collect(effects, target, subjects=labels, mask=DATA / "mask.nii.gz")
    return target


def _nilearn(args: argparse.Namespace, **options: Any) -> dict[str, Any]:
    from nilearn.glm.second_level import non_parametric_inference

    _, effects, _ = maps_for(args.subjects)
    start = time.perf_counter()
    out = non_parametric_inference(
        [str(p) for p in effects],
        design_matrix=_design(args.subjects).reset_index(drop=True),
        mask=str(DATA / "mask.nii.gz"),
        n_perm=args.n_perm,
        n_jobs=2,
        random_state=0,
        **options,
    )
    seconds = time.perf_counter() - start
    maps = out if isinstance(out, dict) else {"logp_max_t": out}
    _save(args, {k: np.asarray(v.get_fdata(), dtype=np.float32) for k, v in maps.items()})
    return {"seconds": seconds}


def _bigglm(args: argparse.Namespace, client: Any = None, **options: Any) -> dict[str, Any]:
    from bigglm.inference import permutation_test

    store = _ensure_store(args.subjects)
    start = time.perf_counter()
    out = permutation_test(
        store, _design(args.subjects), n_perm=args.n_perm, seed=0, client=client, **options
    )
    seconds = time.perf_counter() - start
    if args.subjects <= 1000:
        _save(args, _volumes(out))
    return {"seconds": seconds, "exact": bool(out.attrs["exact"])}


def _volumes(out: Any) -> dict[str, np.ndarray]:
    mask = np.asarray(out["mask"].values, dtype=bool)
    maps = {}
    for name in ("t", "tfce", "cluster_extent", "cluster_mass", "p_fwe"):
        if name in out:
            volume = np.zeros(mask.shape, dtype=np.float32)
            volume[mask] = out[name].values  # voxels in C order of the mask
            maps[name] = volume
    return maps


def _save(args: argparse.Namespace, maps: dict[str, np.ndarray]) -> None:
    np.savez_compressed(WORK / f"inference_{args.step}_n{args.subjects}.npz", **maps)


def _cluster_t(n: int) -> float:
    from scipy import stats

    return float(stats.t.isf(CLUSTER_P, df=n - 1))


def _cohort(args: argparse.Namespace) -> dict[str, Any]:
    from bigglm.cluster import client_from_profile
    from bigglm.config import ClusterConfig

    _ensure_store(args.subjects)
    profile = ClusterConfig(n_workers=2, threads_per_worker=1, memory_limit=args.memory_limit)
    with client_from_profile(profile) as client:
        return _bigglm(args, client=client, precision="single")


def _floor(args: argparse.Namespace) -> dict[str, Any]:
    """The products alone: one block of data in memory, every batch and block's product."""
    n, voxels, width = args.subjects, 235_375, 8192
    rng = np.random.default_rng(0)
    block = rng.standard_normal((n, width), dtype=np.float32)
    batch = 512
    signs = np.where(rng.random((batch, n)) < 0.5, -1.0, 1.0).astype(np.float32)
    n_blocks = -(-voxels // width)
    start = time.perf_counter()
    for b in range(n_blocks):
        view = block if b < n_blocks - 1 else block[:, : voxels - width * (n_blocks - 1)]
        for _ in range(0, args.n_perm, batch):
            np.matmul(signs, view)
    seconds = time.perf_counter() - start
    flops = 2.0 * n * voxels * args.n_perm
    return {"seconds": seconds, "gflops": flops / seconds / 1e9}


STEPS = {
    "nilearn_maxt": lambda a: _nilearn(a),
    "nilearn_tfce": lambda a: _nilearn(a, tfce=True),
    "nilearn_cluster": lambda a: _nilearn(a, threshold=CLUSTER_P),
    "bigglm_maxt": lambda a: _bigglm(a),
    "bigglm_tfce": lambda a: _bigglm(a, tfce=True),
    "bigglm_cluster": lambda a: _bigglm(a, cluster_threshold=_cluster_t(a.subjects)),
    "cohort": _cohort,
    "floor": _floor,
}


def run_step(args: argparse.Namespace) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    import nilearn.glm.second_level  # noqa: F401

    import bigglm.inference.permutation  # noqa: F401  (imports outside the clock)

    output = STEPS[args.step](args)
    (WORK / f"inference_{args.step}_n{args.subjects}.json").write_text(json.dumps(output))


# --- the driver ------------------------------------------------------------------------


def measure(name: str, subjects: int, n_perm: int, memory_limit: str = "2GB") -> dict[str, Any]:
    from benchmarks.run import run_sampled

    cmd = [sys.executable, "-m", "benchmarks.inference", "--step", name]
    cmd += ["--subjects", str(subjects), "--n-perm", str(n_perm), "--memory-limit", memory_limit]
    code, wall, peaks = run_sampled(cmd, name, cwd=REPO, timeout=STEP_TIMEOUT)
    if code != 0:
        raise SystemExit(f"benchmark step {name} failed, status {code}")
    row = json.loads((WORK / f"inference_{name}_n{subjects}.json").read_text())
    row.update(step=name, subjects=subjects, n_perm=n_perm, wall=wall)
    row.update(peak_gib=peaks[0] / 2**30, peak_worker_gib=peaks[2] / 2**30)
    row["per_perm"] = row["seconds"] / n_perm
    logger.info(
        "%-16s n=%-6d perms=%-6d %8.1f s  peak %.2f GiB",
        name,
        subjects,
        n_perm,
        row["seconds"],
        row["peak_gib"],
    )
    return row


def agreement(subjects: int) -> list[dict[str, Any]]:
    """Observed maps, bigglm vs nilearn (the same data; rearrangement-free)."""
    rows = []
    pairs = [
        ("maxt", "logp_max_t", "p_fwe"),
        ("tfce", "tfce", "tfce"),
        ("tfce", "t", "t"),
        ("cluster", "size", "cluster_extent"),
        ("cluster", "mass", "cluster_mass"),
    ]
    for kind, theirs, ours in pairs:
        a = WORK / f"inference_nilearn_{kind}_n{subjects}.npz"
        b = WORK / f"inference_bigglm_{kind}_n{subjects}.npz"
        if not (a.exists() and b.exists()) or theirs == "logp_max_t":
            continue
        x, y = np.load(a)[theirs], np.load(b)[ours]
        scale = float(np.abs(x).max()) or 1.0
        rows.append({"map": theirs, "max_abs_diff_rel": float(np.abs(x - y).max() / scale)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["nilearn", "cohort"])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--n-perm", type=int, default=10_000)
    parser.add_argument("--nilearn-perm", type=int, default=100, help="nilearn TFCE/cluster")
    parser.add_argument("--cohort-subjects", type=int, default=10_000)
    parser.add_argument("--memory-limit", default="2GB")
    parser.add_argument("--step", choices=sorted(STEPS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.step:
        run_step(args)
        return
    rows = []
    if "nilearn" in args.parts:
        n = args.subjects
        rows.append(measure("nilearn_maxt", n, args.n_perm))
        rows.append(measure("bigglm_maxt", n, args.n_perm))
        for kind in ("tfce", "cluster"):
            rows.append(measure(f"nilearn_{kind}", n, args.nilearn_perm))
            rows.append(measure(f"bigglm_{kind}", n, args.n_perm))
    if "cohort" in args.parts:
        rows.append(measure("floor", args.cohort_subjects, args.n_perm))
        rows.append(measure("cohort", args.cohort_subjects, args.n_perm, args.memory_limit))
    report = {"rows": rows, "agreement": agreement(args.subjects), "ratios": _ratios(rows)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(report, indent=2))
    print(_markdown(report))


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["step"]: r for r in rows}
    out = []
    for kind in ("maxt", "tfce", "cluster"):
        if f"nilearn_{kind}" in by and f"bigglm_{kind}" in by:
            ratio = by[f"nilearn_{kind}"]["per_perm"] / by[f"bigglm_{kind}"]["per_perm"]
            out.append(
                {
                    "what": f"{kind}: nilearn / bigglm per rearrangement",
                    "ratio": ratio,
                    "target": ">= 50",
                }
            )
    if "cohort" in by and "floor" in by:
        out.append(
            {
                "what": "cohort / matrix-product floor",
                "ratio": by["cohort"]["seconds"] / by["floor"]["seconds"],
                "target": "<= 1.5",
            }
        )
    return out


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "| step | subjects | rearrangements | seconds | s / rearrangement | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['step']} | {r['subjects']} | {r['n_perm']} | {r['seconds']:.1f} | "
        f"{r['per_perm']:.4g} | {r['peak_gib']:.2f} |"
        for r in report["rows"]
    ]
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['ratio']:.1f} | {r['target']} |" for r in report["ratios"]]
    if report["agreement"]:
        lines += ["", "| map (observed) | max abs diff / max |", "|---|---|"]
        lines += [f"| {a['map']} | {a['max_abs_diff_rel']:.2g} |" for a in report["agreement"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
