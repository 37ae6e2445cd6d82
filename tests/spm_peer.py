"""Reading SPM's own files in ``../shared/peer-data/pyhrf_localizer`` (shared by the SPM tests)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.io

PEER = Path(__file__).resolve().parents[2] / "shared" / "peer-data"
LOCALIZER = PEER / "pyhrf_localizer"


def spm_mat(version: str) -> Any:
    """The ``SPM`` structure SPM5, SPM8 or SPM12 saved for the localizer."""
    raw = gzip.open(LOCALIZER / f"SPM_v{version}.mat.gz").read()
    mat = scipy.io.loadmat(io.BytesIO(raw), squeeze_me=True, struct_as_record=False)
    return mat["SPM"]


def session_events(spm: Any, session: int) -> pd.DataFrame:
    """The onsets and durations SPM was given for one session (units: seconds)."""
    rows = []
    for u in np.atleast_1d(spm.Sess[session].U):
        onsets = np.atleast_1d(u.ons).astype(float)
        durations = np.broadcast_to(np.atleast_1d(u.dur).astype(float), onsets.shape)
        rows += [(str(u.name), o, d) for o, d in zip(onsets, durations, strict=True)]
    return pd.DataFrame(rows, columns=["trial_type", "onset", "duration"])
