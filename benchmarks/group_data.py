"""Group-level benchmark data: per-subject effect and variance maps, generated once.

Each subject has one effect map and one variance map, 3D float32 ``.nii.gz`` on nilearn's
MNI152 2 mm grid (99 x 117 x 95): inside its brain mask (235,375 voxels) the effect is
normal(0.3, 1) and the variance uniform(0.5, 2); outside it both are 0, as nilearn and FSL
write them. A participants table gives each subject an age (uniform 20-70) and a group
("control" or "patient", alternating). Subject ``k`` (``sub-00001`` is k = 1) is drawn from
its own seed, so a prefix of the subjects is the same data set whatever the total.

Files are gzipped with ISA-L at level 1 (about ten times faster than nibabel's default
zlib level; the inside of the brain is random floats, which no level compresses much),
in 2 processes. ``python -m benchmarks.group_data --subjects 1000`` writes the first 1,000
under ``benchmarks/data/group/`` (about 2.2 GB), keeping those already there.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent / "data" / "group"
SEED = 20261203
EFFECT_MEAN, EFFECT_SD = 0.3, 1.0
VARIANCE_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class GroupData:
    """Paths of the first ``n`` subjects' maps, the mask and the participants table."""

    root: Path
    n: int

    @property
    def mask(self) -> Path:
        return self.root / "mask.nii.gz"

    @property
    def participants(self) -> Path:
        return self.root / "participants.tsv"

    @property
    def labels(self) -> list[str]:
        return [label(k) for k in range(1, self.n + 1)]

    @property
    def effects(self) -> list[Path]:
        return [map_path(self.root, s, "effect") for s in self.labels]

    @property
    def variances(self) -> list[Path]:
        return [map_path(self.root, s, "variance") for s in self.labels]

    def files(self) -> list[Path]:
        return [self.mask, self.participants, *self.effects, *self.variances]

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())


def label(k: int) -> str:
    return f"sub-{k:05d}"


def map_path(root: Path, subject: str, kind: str) -> Path:
    return root / "maps" / f"{subject}_stat-{kind}.nii.gz"


def brain_mask() -> nib.Nifti1Image:
    """nilearn's MNI152 2 mm brain mask (shipped with nilearn, offline)."""
    from nilearn.datasets import load_mni152_brain_mask

    return load_mni152_brain_mask(resolution=2)


def participants(n: int) -> pd.DataFrame:
    """Age uniform in 20-70 (one draw per subject, its own seed) and alternating groups."""
    ages = [20.0 + 50.0 * np.random.default_rng((SEED, k, 1)).random() for k in range(1, n + 1)]
    return pd.DataFrame(
        {
            "participant_id": [label(k) for k in range(1, n + 1)],
            "age": np.round(ages, 2),
            "group": ["control" if k % 2 else "patient" for k in range(1, n + 1)],
        }
    )


def _write_gz(img: nib.Nifti1Image, path: Path) -> None:
    """``img`` as ``.nii.gz``, ISA-L level 1, atomically (a temporary name, then rename)."""
    from isal import igzip

    partial = path.with_name(path.name + ".partial")
    with igzip.open(partial, "wb", compresslevel=1) as out:
        out.write(img.to_bytes())
    partial.rename(path)


def _subject(args: tuple[Path, int, np.ndarray, np.ndarray]) -> None:
    """Write subject k's effect and variance maps (if absent)."""
    root, k, flat_index, affine = args
    subject = label(k)
    rng = np.random.default_rng((SEED, k, 0))
    draws = {
        "effect": rng.normal(EFFECT_MEAN, EFFECT_SD, flat_index.size),
        "variance": rng.uniform(*VARIANCE_RANGE, flat_index.size),
    }
    for kind, values in draws.items():
        path = map_path(root, subject, kind)
        if path.exists():
            continue
        volume = np.zeros((99, 117, 95), dtype=np.float32)
        volume.reshape(-1)[flat_index] = values.astype(np.float32)
        img = nib.Nifti1Image(volume, affine)
        img.header.set_data_dtype(np.float32)
        img.header.set_xyzt_units("mm")
        _write_gz(img, path)


def write_group(n: int, root: Path = ROOT, *, processes: int = 2) -> GroupData:
    """Generate the first ``n`` subjects under ``root`` (those present are kept)."""
    data = GroupData(root, n)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    mask_img = brain_mask()
    mask = np.asarray(mask_img.dataobj).astype(bool)
    if mask.shape != (99, 117, 95):
        raise SystemExit(f"nilearn's MNI 2 mm mask has shape {mask.shape}, expected (99, 117, 95)")
    if not data.mask.exists():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), mask_img.affine), data.mask)
    table = participants(n)
    if not data.participants.exists() or len(pd.read_csv(data.participants, sep="\t")) != n:
        table.to_csv(data.participants, sep="\t", index=False)
    todo = [
        k
        for k in range(1, n + 1)
        if not all(map_path(root, label(k), kind).exists() for kind in ("effect", "variance"))
    ]
    if todo:
        flat_index = np.flatnonzero(mask.reshape(-1))  # C order of the (x, y, z) array
        start = time.perf_counter()
        jobs = [(root, k, flat_index, mask_img.affine) for k in todo]
        with ProcessPoolExecutor(max_workers=processes) as pool:
            for done, _ in enumerate(pool.map(_subject, jobs, chunksize=16), start=1):
                if done % 100 == 0 or done == len(jobs):
                    logger.info("wrote %d/%d subjects' maps", done, len(jobs))
        logger.info(
            "generated %d subjects in %.1f s (%.2f GB for all %d)",
            len(todo),
            time.perf_counter() - start,
            data.nbytes() / 1e9,
            n,
        )
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = write_group(args.subjects, processes=args.processes)
    print(f"{data.n} subjects under {data.root}: {data.nbytes() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
