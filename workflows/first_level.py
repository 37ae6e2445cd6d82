#!/usr/bin/env python3
"""First level for one subject of an fMRIPrep dataset, step by step with the Python API.

What ``bigglm run`` does, spelled out: find the runs, convert each to a store, build the
designs, fit all runs together on a Dask cluster, and write a map per contrast.

    python workflows/first_level.py DERIVATIVES SUBJECT TASK OUTPUT \
        --raw RAW --contrast "faces_minus_houses=faces - houses" --noise ar1
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import bigglm
from bigglm.bids import find_runs
from bigglm.cluster import client_from_profile
from bigglm.config import ClusterConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("derivatives", type=Path)
    parser.add_argument("subject")
    parser.add_argument("task")
    parser.add_argument("output", type=Path)
    parser.add_argument("--raw", type=Path, help="raw BIDS root (events)")
    parser.add_argument("--confounds", nargs="*", default=["trans_*", "rot_*"])
    parser.add_argument("--contrast", action="append", required=True, metavar="NAME=EXPR")
    parser.add_argument("--noise", default="ar1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    runs = find_runs(args.derivatives, raw=args.raw, subjects=[args.subject], tasks=[args.task])
    args.output.mkdir(parents=True, exist_ok=True)
    stores, designs = [], []
    for run in runs:
        store = args.output / f"{run.name}_bold.zarr"
        if not store.exists():
            bigglm.convert(run.bold, store, mask=run.mask, tr=run.tr)
        ds = bigglm.open_run(store)
        designs.append(
            bigglm.design.make_run_design(
                ds.sizes["time"],
                ds.attrs["tr"],
                events=run.events,
                confounds=run.confounds if args.confounds else None,
                confound_columns=args.confounds or None,
            )
        )
        stores.append(store)

    with client_from_profile(ClusterConfig()) as client:  # a LocalCluster sized to the machine
        result = bigglm.fit(stores, designs, noise=args.noise, client=client).compute()
    result.to_zarr(args.output / f"sub-{args.subject}_task-{args.task}_glm.zarr", overwrite=True)
    contrasts = dict(item.split("=", 1) for item in args.contrast)
    # named by the runs' BIDS entities (sub-01_task-faces_contrast-..._stat-t_statmap.nii.gz)
    for path in result.to_nifti(args.output, contrasts, overwrite=True):
        print(path)


if __name__ == "__main__":
    main()
