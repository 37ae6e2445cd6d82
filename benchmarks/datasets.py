"""Realistic benchmark data, generated once and reused.

One run is a 4D float32 NIfTI on the MNI152 2 mm grid (99 x 117 x 95): inside nilearn's
brain mask (235,375 voxels) the signal is a baseline near 10,000, two conditions ("faces",
"houses") in alternating 20 s blocks convolved with the Glover HRF (nilearn's own design
builder, so the truth does not come from the code under test), a slow cosine drift, and
AR(1) noise; outside the mask it is 0. The run is written volume block by volume block, so
generating a 16x run needs no more memory than a 1x one, as ``.nii`` and, from the same
bytes, as ``.nii.gz``.

Sizes scale by run length (``n_volumes``) and by voxel size (``resolution``: 2 mm gives
235,375 voxels; 1 mm about eight times as many).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data"
BLOCK = 40  # volumes generated and written at a time


@dataclass(frozen=True)
class Spec:
    """What one benchmark run looks like."""

    n_volumes: int = 400
    resolution: int = 2
    tr: float = 2.0
    rho: float = 0.4
    noise_sd: float = 40.0
    seed: int = 0

    @property
    def name(self) -> str:
        return f"mni{self.resolution}mm_t{self.n_volumes}_s{self.seed}"


@dataclass(frozen=True)
class Run:
    """Paths of a generated run."""

    nii: Path
    niigz: Path
    mask: Path
    events: Path
    truth: Path
    spec: Spec


def events_table(spec: Spec) -> pd.DataFrame:
    """Alternating 20 s blocks of faces and houses, one every 40 s, for the run's length."""
    duration = spec.n_volumes * spec.tr
    onsets = np.arange(10.0, duration - 20.0, 40.0)
    kinds = np.where(np.arange(onsets.size) % 2 == 0, "faces", "houses")
    return pd.DataFrame({"onset": onsets, "duration": 20.0, "trial_type": kinds})


def brain_mask(resolution: int) -> nib.Nifti1Image:
    """nilearn's MNI152 brain mask at ``resolution`` mm (shipped with nilearn, offline)."""
    from nilearn.datasets import load_mni152_brain_mask

    return load_mni152_brain_mask(resolution=resolution)


def _truth_maps(ijk: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Baseline and two smooth activation blobs, one per condition (values per voxel)."""
    centre = ijk.mean(axis=0)
    spread = ijk.std(axis=0)

    def blob(offset: np.ndarray, amplitude: float) -> np.ndarray:
        d2 = (((ijk - (centre + offset * spread)) / (0.25 * spread)) ** 2).sum(axis=1)
        return amplitude * np.exp(-0.5 * d2)

    return {
        "baseline": 10_000.0 + 500.0 * rng.standard_normal(ijk.shape[0]),
        "faces": blob(np.array([0.6, -0.5, -0.3]), 60.0),
        "houses": blob(np.array([-0.6, -0.5, -0.3]), 45.0),
        "drift": 30.0 * rng.standard_normal(ijk.shape[0]),
    }


def _design(spec: Spec) -> pd.DataFrame:
    from nilearn.glm.first_level import make_first_level_design_matrix

    frame_times = np.arange(spec.n_volumes) * spec.tr
    return make_first_level_design_matrix(
        frame_times, events_table(spec), hrf_model="glover", drift_model=None
    )


def _header(mask: nib.Nifti1Image, spec: Spec) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape((*mask.shape, spec.n_volumes))
    header.set_data_dtype(np.float32)
    header.set_qform(mask.affine, code=1)
    header.set_sform(mask.affine, code=1)
    header.set_xyzt_units("mm", "sec")
    zooms = list(header.get_zooms())
    zooms[3] = spec.tr
    header.set_zooms(zooms)
    return header


def write_run(spec: Spec, root: Path = DATA, *, compressed: bool = True) -> Run:
    """Generate the run described by ``spec`` under ``root`` unless it is already there.

    ``compressed=False`` skips the ``.nii.gz`` copy (the scaling sweep needs only ``.nii``).
    """
    folder = root / spec.name
    run = Run(
        nii=folder / "bold.nii",
        niigz=folder / "bold.nii.gz",
        mask=folder / "mask.nii.gz",
        events=folder / "events.tsv",
        truth=folder / "truth.npz",
        spec=spec,
    )
    if (folder / "spec.json").exists():
        return run
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    mask_img = brain_mask(spec.resolution)
    mask = np.asarray(mask_img.dataobj).astype(bool)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), mask_img.affine), run.mask)
    events_table(spec).to_csv(run.events, sep="\t", index=False)
    _write_series(run, mask, mask_img, spec)
    if compressed:
        _gzip(run.nii, run.niigz)
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return run


def _write_series(run: Run, mask: np.ndarray, mask_img: nib.Nifti1Image, spec: Spec) -> None:
    rng = np.random.default_rng(spec.seed)
    ijk = np.argwhere(mask)
    truth = _truth_maps(ijk, rng)
    np.savez(run.truth, **truth)
    design = _design(spec)
    signal = design[["faces", "houses"]].to_numpy()
    t = np.arange(spec.n_volumes) * spec.tr
    slow = np.cos(np.pi * t / (spec.n_volumes * spec.tr))
    innovation_sd = spec.noise_sd * np.sqrt(1 - spec.rho**2)
    state = spec.noise_sd * rng.standard_normal(ijk.shape[0])
    flat = np.zeros(mask.size, dtype=np.float32)  # one volume, NIfTI (Fortran) order
    fortran_flat = np.flatnonzero(mask.ravel(order="F"))
    with open(run.nii, "wb") as out:
        _header(mask_img, spec).write_to(out)
        for start in range(0, spec.n_volumes, BLOCK):
            for n in range(start, min(start + BLOCK, spec.n_volumes)):
                state = spec.rho * state + innovation_sd * rng.standard_normal(state.size)
                values = (
                    truth["baseline"]
                    + signal[n, 0] * truth["faces"]
                    + signal[n, 1] * truth["houses"]
                    + slow[n] * truth["drift"]
                    + state
                )
                flat[fortran_flat] = values
                out.write(flat.tobytes())
            logger.info(
                "%s: %d/%d volumes", run.nii, min(start + BLOCK, spec.n_volumes), spec.n_volumes
            )


def _gzip(source: Path, target: Path) -> None:
    from isal import igzip

    partial = target.with_suffix(".partial")
    with open(source, "rb") as src, igzip.open(partial, "wb", compresslevel=2) as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)
    partial.rename(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=Spec.n_volumes)
    parser.add_argument("--resolution", type=int, default=Spec.resolution, choices=(1, 2))
    parser.add_argument("--seed", type=int, default=Spec.seed)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run = write_run(Spec(n_volumes=args.volumes, resolution=args.resolution, seed=args.seed))
    print(run.nii, run.niigz)


if __name__ == "__main__":
    main()
