"""Surfaces at an HCP run's size: CIFTI-2 grayordinates, bigglm beside nilearn's surface GLM.

    python -m benchmarks.surface                 # 91,282 grayordinates x 1,200 volumes
    python -m benchmarks.surface --volumes 300 --repeat 1    # a quick look

The data (``benchmarks/data/surface/``, made when absent, 0.44 GB): one fsLR 91k-sized
dense series, TR 0.72 s like HCP's: 29,696 + 29,716 cortex vertices of two 32,492-vertex
hemispheres (the rest is the medial wall) and 31,870 subcortical voxels, float32, two
conditions in 20 s blocks (Glover HRF, bigglm's design with its cosine drift at 0.01 Hz)
plus white noise. The steps, timed in this one process, in turn, ``--repeat`` times
(median reported; every input read once before the first repeat, so the page cache is
warm for all alike):

- ``read``: the floor, nibabel reading the whole ``.dtseries.nii`` into memory;
- ``convert``: ``bigglm.convert`` of the ``.dtseries.nii`` to a store (written again
  each repeat, in this benchmark's own work folder);
- ``fit``: ``bigglm.fit`` (OLS) of that store and one t contrast's z, all 91,282
  grayordinates, threads;
- ``nilearn``: nilearn's ``FirstLevelModel`` (OLS, ``signal_scaling=False``,
  ``minimize_memory=True``) on a ``SurfaceImage`` of both hemispheres' cortex (the
  vertices only, 59,412 in its mask; nilearn's surface GLM has no subcortical voxels),
  data already in memory before the clock starts, and ``compute_contrast``'s z.

So bigglm fits about 1.5 times the columns nilearn fits, from the disk's store; the
ratios are conservative. z agreement on the cortex is checked. Results are printed as a
Markdown table and written to ``benchmarks/results/<output>.json``.
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
import pandas as pd

from benchmarks.datasets import DATA

RESULTS = Path(__file__).resolve().parent / "results"
FOLDER = DATA / "surface"
TR = 0.72
HEMISPHERE = 32492
CORTEX = {"CortexLeft": 29696, "CortexRight": 29716}
SUBCORTICAL = 31870
CONTRAST = "faces - houses"


def events(n_volumes: int) -> pd.DataFrame:
    """Alternating 20 s blocks of the two conditions, 10 s apart."""
    onsets = np.arange(10.0, n_volumes * TR - 20.0, 30.0)
    kinds = ["faces", "houses"] * len(onsets)
    return pd.DataFrame({"onset": onsets, "duration": 20.0, "trial_type": kinds[: len(onsets)]})


def design(n_volumes: int) -> pd.DataFrame:
    import bigglm

    return bigglm.design.make_run_design(n_volumes, TR, events=events(n_volumes))


def cortex_masks() -> dict[str, np.ndarray]:
    """Which of each hemisphere's 32,492 vertices are cortex (HCP's counts; the rest,
    the medial wall, a fixed random choice)."""
    rng = np.random.default_rng(91)
    masks = {}
    for structure, n in CORTEX.items():
        keep = np.zeros(HEMISPHERE, bool)
        keep[np.sort(rng.choice(HEMISPHERE, n, replace=False))] = True
        masks[structure] = keep
    return masks


def write_data(n_volumes: int) -> Path:
    """The dense series (made once per length)."""
    import nibabel as nib
    from nibabel import cifti2

    path = FOLDER / f"fsLR91k_t{n_volumes}.dtseries.nii"
    if path.exists():
        return path
    FOLDER.mkdir(parents=True, exist_ok=True)
    masks = cortex_masks()
    volume = np.zeros((91, 109, 91), bool)
    flat = np.flatnonzero(np.ones(volume.shape, bool))
    rng = np.random.default_rng(0)
    volume.flat[np.sort(rng.choice(flat, SUBCORTICAL, replace=False))] = True
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    models = (
        cifti2.BrainModelAxis.from_mask(masks["CortexLeft"], "CortexLeft")
        + cifti2.BrainModelAxis.from_mask(masks["CortexRight"], "CortexRight")
        + cifti2.BrainModelAxis.from_mask(volume, "thalamus_left", affine=affine)
    )
    x = design(n_volumes).to_numpy()
    n = len(models)
    data = np.empty((n_volumes, n), np.float32)
    for lo in range(0, n, 8192):
        hi = min(n, lo + 8192)
        beta = rng.normal(size=(x.shape[1], hi - lo)) * 0.5
        beta[-1] = 1000.0  # the constant: a baseline near 1,000
        noise = rng.standard_normal((n_volumes, hi - lo))
        data[:, lo:hi] = x @ beta + 5.0 * noise
    image = nib.Cifti2Image(data, header=(cifti2.SeriesAxis(0.0, TR, n_volumes), models))
    image.nifti_header.set_intent("NIFTI_INTENT_CONNECTIVITY_DENSE_SERIES")
    partial = path.with_name(path.name + ".partial.nii")
    nib.save(image, partial)
    partial.replace(path)
    return path


def _read(path: Path) -> Any:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj)


def _convert(path: Path, target: Path) -> Path:
    import bigglm

    return bigglm.convert(path, target, overwrite=True)  # replaces only a store bigglm wrote


def _fit(store: Path, x: pd.DataFrame) -> np.ndarray:
    import bigglm

    return np.asarray(bigglm.fit(store, x, noise="ols").contrast(CONTRAST)["z"].values)


def _nilearn_inputs(data: np.ndarray) -> tuple[Any, Any]:
    """nilearn's SurfaceImage of both hemispheres' cortex and its mask, on a mesh of
    the right size (nilearn's GLM uses the mesh only for its vertex counts)."""
    from nilearn.surface import InMemoryMesh, PolyMesh, SurfaceImage

    rng = np.random.default_rng(1)
    masks = cortex_masks()
    parts, mask_parts, meshes = {}, {}, {}
    start = 0
    for part, structure in (("left", "CortexLeft"), ("right", "CortexRight")):
        keep = masks[structure]
        full = np.zeros((HEMISPHERE, data.shape[0]), np.float32)
        full[keep] = data[:, start : start + int(keep.sum())].T
        start += int(keep.sum())
        parts[part], mask_parts[part] = full, keep
        faces = rng.integers(0, HEMISPHERE, size=(2 * HEMISPHERE, 3))
        meshes[part] = InMemoryMesh(rng.normal(size=(HEMISPHERE, 3)), faces)
    mesh = PolyMesh(**meshes)
    return SurfaceImage(mesh, parts), SurfaceImage(mesh, mask_parts)


def _nilearn(image: Any, mask: Any, x: pd.DataFrame) -> np.ndarray:
    from nilearn.glm.first_level import FirstLevelModel

    model = FirstLevelModel(
        noise_model="ols", signal_scaling=False, mask_img=mask, minimize_memory=True
    )
    model.fit(image, design_matrices=x)
    z = model.compute_contrast(CONTRAST, output_type="z_score")
    masks = cortex_masks()
    return np.concatenate(
        [
            np.asarray(z.data.parts[p])[masks[s]]
            for p, s in (("left", "CortexLeft"), ("right", "CortexRight"))
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=1200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", default="surface")
    args = parser.parse_args()
    path = write_data(args.volumes)
    x = design(args.volumes)
    target = FOLDER / "work" / f"{path.name}.zarr"
    target.parent.mkdir(parents=True, exist_ok=True)
    data = _read(path)  # also warms the page cache
    image, mask = _nilearn_inputs(data)
    n_cortex = sum(CORTEX.values())
    times: dict[str, list[float]] = {"read": [], "convert": [], "fit": [], "nilearn": []}
    ours = theirs = np.zeros(0)
    for _ in range(args.repeat):
        for name in times:
            start = time.perf_counter()
            if name == "read":
                _read(path)
            elif name == "convert":
                _convert(path, target)
            elif name == "fit":
                ours = _fit(target, x)
            else:
                theirs = _nilearn(image, mask, x)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    gap = float(np.max(np.abs(ours[:n_cortex] - theirs)))
    ratios = {
        "nilearn / bigglm fit from the store": median["nilearn"] / median["fit"],
        "bigglm convert / bare read": median["convert"] / median["read"],
    }
    targets = {
        "nilearn / bigglm fit from the store": ">= 10",
        "bigglm convert / bare read": "<= 1.5",
    }
    print(f"{data.shape[1]:,} grayordinates x {args.volumes:,} volumes, {x.shape[1]} columns")
    print("| step | median (s) | repeats (s) |\n| --- | --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {median[name]:.2f} | {' / '.join(f'{v:.2f}' for v in values)} |")
    print("| ratio | measured | target |\n| --- | --- | --- |")
    for label, value in ratios.items():
        print(f"| {label} | {value:.2f} | {targets[label]} |")
    print(f"largest |z| difference from nilearn on the cortex: {gap:.2e}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.output}.json"
    out.write_text(
        json.dumps(
            {
                "machine": {"platform": platform.platform(), "python": platform.python_version()},
                "data": {"grayordinates": int(data.shape[1]), "volumes": args.volumes},
                "columns": int(x.shape[1]),
                "seconds": times,
                "median": median,
                "ratios": ratios,
                "max_abs_z_difference": gap,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
