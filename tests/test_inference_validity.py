"""Family-wise error control on simulated null data.

200 null data sets (20 subjects, smooth Gaussian noise on a 16 x 16 x 12 grid, 3,072
voxels, no effect anywhere); each is tested with 200 sign flips. A data set is a family-
wise false positive when any voxel has FWE p <= 0.05 (max-T, cluster mass at t > 2.5,
TFCE). The rate of each must lie in the binomial 95% interval around 0.05 for 200 data
sets: a permutation test whose p values were off (identity not counted, maxima taken over
a part of the map, ties mishandled) moves it out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import ndimage, stats

from bigglm.inference import permutation_test

N_SETS, N_SUBJECTS, SHAPE, ALPHA = 200, 20, (16, 16, 12), 0.05


def _null_set(seed: int) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((N_SUBJECTS, *SHAPE))
    smooth = np.stack([ndimage.gaussian_filter(v, 1.5, mode="wrap") for v in noise])
    smooth /= smooth.std()
    ijk = np.indices(SHAPE).reshape(3, -1)
    return xr.Dataset(
        {"effect": (("subject", "voxel"), smooth.reshape(N_SUBJECTS, -1))},
        coords={
            "subject": [f"sub-{i:02d}" for i in range(N_SUBJECTS)],
            **{axis: ("voxel", ijk[n]) for n, axis in enumerate("ijk")},
        },
    )


@pytest.mark.slow
def test_family_wise_error_rates_are_nominal() -> None:
    design = pd.DataFrame({"mean": 1.0}, index=[f"sub-{i:02d}" for i in range(N_SUBJECTS)])
    hits = {"p_fwe": 0, "p_cluster_mass_fwe": 0, "p_tfce_fwe": 0}
    for seed in range(N_SETS):
        out = permutation_test(
            _null_set(seed), design, n_perm=200, tfce=True, cluster_threshold=2.5, seed=seed
        )
        for name in hits:
            hits[name] += bool((out[name].values <= ALPHA).any())
    low, high = stats.binom.interval(0.95, N_SETS, ALPHA)
    assert all(low <= count <= high for count in hits.values()), (hits, (low, high))
