"""The measured steps, one per subprocess so that each starts cold and has its own peak RSS.

``python -m benchmarks.steps STEP RUN_DIR WORK_DIR [--workers N] [--memory-limit M]
[--repeat K] [--cold]`` runs one step K times and writes ``WORK_DIR/STEP.json`` with what it
computed (e.g. the z map's summary), ``times`` (each repeat) and ``seconds`` (their median):
the step's own work, timed in-process after the imports every tool needs (numpy, nibabel,
bigglm or nilearn) are done, so that interpreter start-up, which differs between tools and
says nothing about them, stays out of the ratios. The driver also records each process's
whole wall time.

``--cold`` evicts the step's input files (the run's NIfTI files and the stores it reads)
from the operating system's page cache before every repeat (``posix_fadvise``
``DONTNEED``, no privileges needed), so each repeat reads from the disk: the case of data
larger than memory. Without it every input file is read once before each repeat, so the
repeat reads from memory. Either way, pending writes are flushed first (a store the
previous step wrote would otherwise still be going to disk while this one reads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

CONTRAST = "faces - houses"
Step = Callable[[argparse.Namespace], dict[str, float]]
STEPS: dict[str, Step] = {}


def step(func: Step) -> Step:
    STEPS[func.__name__] = func
    return func


def _design(run_dir: Path) -> pd.DataFrame:
    """The design both tools fit: bigglm's, written once beside the data."""
    path = run_dir / "design.csv"
    if not path.exists():
        import bigglm

        spec = json.loads((run_dir / "spec.json").read_text())
        frame_times = bigglm.design.frame_times(spec["n_volumes"], spec["tr"])
        events = pd.read_csv(run_dir / "events.tsv", sep="\t")
        design = bigglm.design.make_design(frame_times, events, hrf="glover", drift="cosine")
        design.to_csv(path)
    return pd.read_csv(path, index_col=0)


def _summary(z: np.ndarray, out: Path) -> dict[str, float]:
    np.save(out, np.asarray(z, dtype=np.float64))
    return {"z_max": float(np.nanmax(z)), "z_min": float(np.nanmin(z))}


# --- floors ------------------------------------------------------------------


@step
def read_nii(args: argparse.Namespace) -> dict[str, float]:
    """nibabel reads the whole uncompressed series into memory."""
    data = np.asarray(nib.load(args.run_dir / "bold.nii", mmap=False).dataobj)
    return {"gib": data.nbytes / 2**30}


@step
def read_niigz_raw(args: argparse.Namespace) -> dict[str, float]:
    """Plain ISA-L decompression of the .nii.gz, discarding the bytes."""
    from isal import igzip

    total = 0
    buffer = bytearray(16 << 20)
    with igzip.open(args.run_dir / "bold.nii.gz", "rb") as src:
        while n := src.readinto(buffer):
            total += n
    return {"gib": total / 2**30}


@step
def read_niigz_nibabel(args: argparse.Namespace) -> dict[str, float]:
    """nibabel reads the whole compressed series into memory (what nilearn does)."""
    data = np.asarray(nib.load(args.run_dir / "bold.nii.gz").dataobj)
    return {"gib": data.nbytes / 2**30}


@step
def read_store(args: argparse.Namespace) -> dict[str, float]:
    """Every chunk of the store read and reduced, with dask's threads: the fit's I/O floor."""
    import bigglm

    bold = bigglm.open_run(_store(args)).bold
    total = float(bold.data.sum(dtype=np.float64).compute(scheduler="threads"))
    return {"sum": total}


# --- bigglm ------------------------------------------------------------------


def _store(args: argparse.Namespace) -> Path:
    return args.work_dir / f"{args.run_dir.name}.zarr"


def _convert(args: argparse.Namespace, source: str) -> Path:
    import bigglm

    store = _store(args)
    if store.exists():
        shutil.rmtree(store)
    return bigglm.convert(args.run_dir / source, store, mask=args.run_dir / "mask.nii.gz")


@step
def convert_nii(args: argparse.Namespace) -> dict[str, float]:
    _convert(args, "bold.nii")
    return {}


@step
def convert_niigz(args: argparse.Namespace) -> dict[str, float]:
    _convert(args, "bold.nii.gz")
    return {}


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    """A LocalCluster of ``--workers`` single-threaded processes, started as ``bigglm run``
    starts one (with ``--malloc distributed``: without bigglm's worker malloc settings), or
    None (bigglm's default, the threaded scheduler)."""
    if not args.workers:
        yield None
        return
    from bigglm.cluster import client_from_profile
    from bigglm.config import ClusterConfig

    profile = ClusterConfig(
        n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit
    )
    with client_from_profile(profile, tune_malloc=args.malloc == "bigglm") as client:
        yield client


def _fit(args: argparse.Namespace, noise: str, stores: Any, n_runs: int = 1) -> dict[str, float]:
    """Fit one store or Dataset (or several runs sharing the design) and compute the
    contrast's z."""
    import bigglm

    designs = [_design(args.run_dir)] * n_runs
    with _client(args) as client:
        runs = stores if isinstance(stores, list) else [stores]
        result = bigglm.fit(runs, designs, noise=noise, client=client)
        z = result.contrast(CONTRAST)["z"].values
    return _summary(z, args.work_dir / f"{args.step}.npy")


@step
def bigglm_ols(args: argparse.Namespace) -> dict[str, float]:
    """Fit + one t contrast from an existing store, OLS."""
    return _fit(args, "ols", _store(args))


@step
def bigglm_ar1(args: argparse.Namespace) -> dict[str, float]:
    """Fit + one t contrast from an existing store, AR(1)."""
    return _fit(args, "ar1", _store(args))


@step
def bigglm_spm_ar1(args: argparse.Namespace) -> dict[str, float]:
    """Fit + one t contrast from an existing store, SPM's pooled AR(0.2) (two passes)."""
    return _fit(args, "spm-ar1", _store(args))


@step
def bigglm_film(args: argparse.Namespace) -> dict[str, float]:
    """Fit + one t contrast from an existing store, FSL FILM prewhitening (whole series per
    voxel block, a pseudo-inverse per voxel)."""
    return _fit(args, "film", _store(args))


def _in_memory(args: argparse.Namespace) -> Any:
    """The store's run read into memory (same chunks), before the clock starts."""
    import bigglm

    run = bigglm.open_run(_store(args))
    run["bold"] = run["bold"].copy(data=run["bold"].data.persist(scheduler="threads"))
    return run


@step
def bigglm_ols_memory(args: argparse.Namespace) -> dict[str, float]:
    """Fit + one t contrast, OLS, of the run already in memory: the arithmetic alone."""
    return _fit(args, "ols", args.preloaded)


@step
def bigglm_ar1_memory(args: argparse.Namespace) -> dict[str, float]:
    """Fit + one t contrast, AR(1), of the run already in memory: the arithmetic alone."""
    return _fit(args, "ar1", args.preloaded)


#: Steps whose input is read into memory before the clock starts (``args.preloaded``).
PRELOADED = ("bigglm_ols_memory", "bigglm_ar1_memory")


@step
def bigglm_e2e_ols(args: argparse.Namespace) -> dict[str, float]:
    """Convert the .nii.gz, fit, contrast: what a user with fMRIPrep output waits for."""
    return _fit(args, "ols", _convert(args, "bold.nii.gz"))


@step
def bigglm_e2e_ar1(args: argparse.Namespace) -> dict[str, float]:
    return _fit(args, "ar1", _convert(args, "bold.nii.gz"))


def _run_stores(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """(run folder, store) of runs 0..n-1: the 1x run with noise seeds 0..n-1."""
    from benchmarks.datasets import DATA, Spec

    names = [Spec(seed=k).name for k in range(args.n_runs)]
    return [(DATA / n, args.work_dir.parent / n / f"{n}.zarr") for n in names]


@step
def convert_runs(args: argparse.Namespace) -> dict[str, float]:
    """Convert those of the n runs that have no complete store yet."""
    import bigglm
    from bigglm.exceptions import StoreError

    converted = 0
    for run_dir, store in _run_stores(args):
        try:
            bigglm.open_run(store)
        except StoreError:
            shutil.rmtree(store, ignore_errors=True)
            store.parent.mkdir(parents=True, exist_ok=True)
            bigglm.convert(run_dir / "bold.nii", store, mask=run_dir / "mask.nii.gz")
            converted += 1
    return {"converted": converted}


@step
def bigglm_runs_ols(args: argparse.Namespace) -> dict[str, float]:
    """One subject's n runs fitted together (OLS), fixed-effects contrast, on worker processes."""
    args.workers = args.workers or 1
    stores = [store for _, store in _run_stores(args)]
    return _fit(args, "ols", stores, n_runs=len(stores))


# --- nilearn -----------------------------------------------------------------


def _nilearn(args: argparse.Namespace, noise: str) -> dict[str, float]:
    from nilearn.glm.first_level import FirstLevelModel

    model = FirstLevelModel(
        mask_img=str(args.run_dir / "mask.nii.gz"),
        noise_model=noise,
        signal_scaling=False,
        minimize_memory=True,
        n_jobs=2,
    )
    with warnings.catch_warnings():  # "a mask was given at masker creation": as intended
        warnings.simplefilter("ignore", RuntimeWarning)
        model.fit(str(args.run_dir / "bold.nii.gz"), design_matrices=[_design(args.run_dir)])
    z_img = model.compute_contrast(CONTRAST, output_type="z_score")
    mask = np.asarray(nib.load(args.run_dir / "mask.nii.gz").dataobj).astype(bool)
    return _summary(np.asarray(z_img.dataobj)[mask], args.work_dir / f"{args.step}.npy")


@step
def nilearn_ols(args: argparse.Namespace) -> dict[str, float]:
    """nilearn FirstLevelModel from the .nii.gz, OLS, fit + one contrast."""
    return _nilearn(args, "ols")


@step
def nilearn_ar1(args: argparse.Namespace) -> dict[str, float]:
    """nilearn FirstLevelModel from the .nii.gz, AR(1), fit + one contrast."""
    return _nilearn(args, "ar1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--workers", type=int, default=0, help="0: bigglm's default")
    parser.add_argument("--memory-limit", default="auto")
    parser.add_argument("--n-runs", type=int, default=1, help="runs of one subject")
    parser.add_argument("--repeat", type=int, default=1, help="times to run the step")
    parser.add_argument(
        "--malloc",
        choices=["bigglm", "distributed"],
        default="bigglm",
        help="the workers' malloc settings: bigglm's (the default) or distributed's own",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="evict the inputs from the page cache each time",
    )
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    _warm_imports(args)
    args.preloaded = _in_memory(args) if args.step in PRELOADED else None
    times = []
    for _ in range(args.repeat):
        os.sync()  # a store written by the previous step is not still being flushed
        if args.cold:
            _evict(args)
        else:
            _prewarm(args)
        start = time.perf_counter()
        output: dict[str, Any] = STEPS[args.step](args)
        times.append(time.perf_counter() - start)
    output["times"] = times
    output["seconds"] = float(np.median(times))
    (args.work_dir / f"{args.step}.json").write_text(json.dumps(output))


def _inputs(args: argparse.Namespace) -> Iterator[Path]:
    """Every file the step may read: the run's folder and the stores."""
    roots = [args.run_dir, _store(args), *(store for _, store in _run_stores(args))]
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from (p for p in root.rglob("*") if p.is_file())


def _evict(args: argparse.Namespace) -> None:
    """Drop the step's possible inputs from the page cache."""
    for path in _inputs(args):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _prewarm(args: argparse.Namespace) -> None:
    """Read the step's possible inputs once, so that they are in the page cache."""
    for path in _inputs(args):
        with path.open("rb") as f:
            while f.read(2**24):
                pass


def _warm_imports(args: argparse.Namespace) -> None:
    """Import what the step's tool needs before the clock starts (distributed only when
    the step starts worker processes: bigglm's default scheduler does not need it)."""
    if args.step.startswith("nilearn"):
        import nilearn.glm.first_level  # noqa: F401
    elif not args.step.startswith(("read_nii", "read_niigz")):
        # the modules themselves: bigglm's package imports are lazy
        import bigglm.design.matrix
        import bigglm.glm.engine
        import bigglm.io.conversion  # noqa: F401

        if args.workers or args.step == "bigglm_runs_ols":
            import distributed  # noqa: F401


if __name__ == "__main__":
    main()
