"""What TLS costs: the benchmark fit on clusters bigglm starts, with and without TLS.

    python -m benchmarks.tls                                # local and slurm, 3 repeats
    python -m benchmarks.tls --profiles local --repeat 5

Every cluster bigglm starts speaks TLS with per-run credentials (:mod:`bigglm.security`);
``cluster.security.tls: false`` is the opt-out. This measures the price, in one process,
the two settings alternating (off, on, on, off, ...) so that a drift of the machine
touches both alike:

- ``start``: from ``client_from_profile`` entered to the workers connected (key and
  certificate generation, writing the credential files for batch, the TLS handshakes;
  for ``slurm`` also the job's queueing, the same for both);
- ``fit``: ``bigglm.fit`` of the 1x benchmark store (235,375 voxels x 400 volumes, 19
  columns, OLS) and one t contrast's z, computed on that cluster: the chunks are read
  by the workers, the per-block results cross the network to the client;
- ``close``: leaving the context (the workers and scheduler stop; batch credentials go).

The data (``benchmarks/data/``, :mod:`benchmarks.datasets`) and the store are made when
absent. ``slurm`` needs a running SLURM (``.ci/slurm-up`` as root): one job with
``--workers`` single-threaded worker processes. The median of each phase and the ratio
on/off are printed as a Markdown table and written to ``benchmarks/results/<output>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.datasets import DATA, Spec, write_run

RESULTS = Path(__file__).resolve().parent / "results"
CONTRAST = "faces - houses"


def _store(run: Any) -> Path:
    """The run's store (made once, beside the benchmark's other work files)."""
    import bigglm

    store = DATA / "work" / "tls" / f"{run.spec.name}.zarr"
    if not store.exists():
        store.parent.mkdir(parents=True, exist_ok=True)
        bigglm.convert(run.nii, store, mask=run.mask)
    return store


def _profile(kind: str, workers: int, tls: bool) -> Any:
    from bigglm.config import ClusterConfig, parse_section

    section: dict[str, Any] = {"profile": kind, "security": {"tls": tls}}
    if kind == "local":
        section.update(n_workers=workers, threads_per_worker=1, memory_limit="4GB")
    else:
        section.update(jobs=1, cores=workers, processes=workers, memory=f"{4 * workers}GB")
        section.update(walltime="01:00:00")
    return parse_section(ClusterConfig, section)


def _once(kind: str, workers: int, tls: bool, store: Path, design: Any) -> dict[str, float]:
    import bigglm
    from bigglm.cluster import client_from_profile

    run = bigglm.open_run(store)
    started = time.perf_counter()
    with client_from_profile(_profile(kind, workers, tls)) as client:
        client.wait_for_workers(workers, timeout=600)
        ready = time.perf_counter()
        assert client.scheduler.address.startswith("tls://" if tls else "tcp://")
        result = bigglm.fit([run], [design], noise="ols", client=client)
        z = result.contrast(CONTRAST)["z"].values
        fitted = time.perf_counter()
    closed = time.perf_counter()
    return {
        "start": ready - started,
        "fit": fitted - ready,
        "close": closed - fitted,
        "z_sum": float(np.nansum(z)),
    }


def _design(run: Any) -> Any:
    import pandas as pd

    import bigglm

    spec = run.spec
    frame_times = bigglm.design.frame_times(spec.n_volumes, spec.tr)
    events = pd.read_csv(run.events, sep="\t")
    return bigglm.design.make_design(frame_times, events, hrf="glover", drift="cosine")


def measure(profiles: list[str], workers: int, repeat: int) -> dict[str, Any]:
    """Alternate TLS off and on ``repeat`` times per profile; every phase's times."""
    run = write_run(Spec(), compressed=False)
    store, design = _store(run), _design(run)
    found: dict[str, Any] = {}
    for kind in profiles:
        times: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for index in range(repeat):
            order = ("off", "on") if index % 2 == 0 else ("on", "off")
            for setting in order:
                times[setting].append(_once(kind, workers, setting == "on", store, design))
                print(kind, setting, times[setting][-1], flush=True)
        found[kind] = times
    return found


def _table(found: dict[str, Any]) -> str:
    lines = [
        "| profile | phase | TLS off (s) | TLS on (s) | on / off |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, times in found.items():
        for phase in ("start", "fit", "close"):
            off = statistics.median(t[phase] for t in times["off"])
            on = statistics.median(t[phase] for t in times["on"])
            lines.append(f"| {kind} | {phase} | {off:.2f} | {on:.2f} | {on / off:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["local", "slurm"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", default="tls")
    args = parser.parse_args()
    found = measure(args.profiles, args.workers, args.repeat)
    for times in found.values():  # the same numbers with and without TLS (to a few ulps)
        sums = [t["z_sum"] for setting in times.values() for t in setting]
        assert max(sums) - min(sums) <= 1e-9 * max(abs(s) for s in sums), sums
    table = _table(found)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    record = {
        "command": f"python -m benchmarks.tls --profiles {' '.join(args.profiles)} "
        f"--workers {args.workers} --repeat {args.repeat}",
        "machine": platform.platform(),
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "times": found,
        "table": table,
    }
    (RESULTS / f"{args.output}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
