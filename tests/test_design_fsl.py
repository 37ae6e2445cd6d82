"""FSL FEAT conventions (``bigglm.design.fsl``) against what FEAT computed.

Reference, none written here (``../shared/peer-data``, see its README):
``fsl_film_realdata/1stlevel_realdata.feat``, a real FSL 5.0.9 FEAT first level: 45 scans,
TR 3 s, two block EVs (square waves, ``shape 0``) convolved with FEAT's gamma
(``convolve 2``, sigma 3 s, delay 6 s), each with its temporal derivative
(``deriv_yn 1``), no orthogonalisation, no high-pass on the data (``temphp_yn 0``, so the
EVs were not filtered either). The test rebuilds the EVs from ``design.fsf``'s own
square-wave settings and compares with ``design.mat``. Tolerance 1e-6 of each column's
peak: ``design.mat`` prints 7 significant digits, i.e. up to 5e-7 of a value of
magnitude 1 (seen: 4.4e-7 on the EVs, 7.7e-7 on the derivatives, whose peak is 0.36).

The high-pass filter is not in that FEAT, so it is checked against its definition
(a least-squares line with Gaussian weights, fitted here by ``numpy.polyfit``) and
against invariants that a wrong filter fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from spm_peer import PEER

from bigglm.design import make_run_design
from bigglm.design.fsl import feat_kernel, fsl_design, fsl_highpass_filter, fsl_highpass_matrix
from bigglm.exceptions import DesignError

FEAT = PEER / "fsl_film_realdata" / "1stlevel_realdata.feat"


def read_fsf(path: Path) -> dict[str, str]:
    """``set fmri(key) value`` lines of a ``design.fsf``."""
    pattern = re.compile(r"^set fmri\(([^)]+)\)\s+(.*?)\s*$")
    return {m[1]: m[2].strip('"') for m in map(pattern.match, path.read_text().splitlines()) if m}


def read_vest(path: Path) -> np.ndarray:
    """The ``/Matrix`` of an FSL VEST file (``design.mat``), checked against its header."""
    text = path.read_text().splitlines()
    header = dict(
        line.split(None, 1)
        for line in text
        if line.startswith("/") and " " in line.replace("\t", " ")
    )
    start = text.index("/Matrix") + 1
    matrix = np.array([[float(v) for v in line.split()] for line in text[start:] if line.strip()])
    assert matrix.shape == (int(header["/NumPoints"]), int(header["/NumWaves"]))
    return matrix


def square_wave_events(fsf: dict[str, str], ev: int, duration: float) -> pd.DataFrame:
    """FEAT's square wave (``shape 0``) of EV ``ev`` as on-blocks: on while
    ``(t - skip + phase) mod (on + off) >= off``."""
    off, on = float(fsf[f"off{ev}"]), float(fsf[f"on{ev}"])
    phase, skip = float(fsf[f"phase{ev}"]), float(fsf[f"skip{ev}"])
    assert fsf[f"shape{ev}"] == "0" and fsf[f"stop{ev}"] == "-1"
    period = on + off
    starts = skip + off - phase + period * np.arange(-2, int(duration / period) + 2)
    blocks = [(max(s, skip), s + on) for s in starts if s + on > skip and s < duration]
    return pd.DataFrame(
        {
            "onset": [b[0] for b in blocks],
            "duration": [b[1] - b[0] for b in blocks],
            "trial_type": fsf[f"evtitle{ev}"],
        }
    )


def _peak_error(mine: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(mine - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def feat() -> tuple[dict[str, str], np.ndarray, pd.DataFrame]:
    fsf = read_fsf(FEAT / "design.fsf")
    n, tr = int(fsf["npts"]), float(fsf["tr"])
    events = pd.concat([square_wave_events(fsf, ev, n * tr) for ev in (1, 2)], ignore_index=True)
    return fsf, read_vest(FEAT / "design.mat"), events


def test_feat_settings_are_the_ones_rebuilt(
    feat: tuple[dict[str, str], np.ndarray, pd.DataFrame],
) -> None:
    """The FEAT run used the gamma, derivatives, no orthogonalisation, no high-pass."""
    fsf, _, _ = feat
    for ev in ("1", "2"):
        assert fsf[f"convolve{ev}"] == "2" and fsf[f"deriv_yn{ev}"] == "1"
        assert (fsf[f"gammasigma{ev}"], fsf[f"gammadelay{ev}"]) == ("3", "6")
        assert fsf[f"convolve_phase{ev}"] == "0"
        assert all(fsf[f"ortho{ev}.{j}"] == "0" for j in range(3))
    assert fsf["temphp_yn"] == "0"


def test_design_equals_design_mat(feat: tuple[dict[str, str], np.ndarray, pd.DataFrame]) -> None:
    fsf, mat, events = feat
    X = make_run_design(
        int(fsf["npts"]),
        float(fsf["tr"]),
        events=events,
        convention="fsl",
        hrf="gamma",
        derivative=True,
        high_pass=None,
    )
    assert list(X.columns) == [
        "visual",
        "visual_derivative",
        "auditory",
        "auditory_derivative",
        "constant",
    ]
    for j, name in enumerate(X.columns[:4]):
        assert _peak_error(X[name].to_numpy(), mat[:, j]) < 1e-6, name
    np.testing.assert_allclose(X.index, np.arange(45) * 3.0 + 1.5)
    np.testing.assert_array_equal(X["constant"], 1.0)


def test_each_feat_rule_matters(feat: tuple[dict[str, str], np.ndarray, pd.DataFrame]) -> None:
    """Sampling at the scan start, or a convolution without FEAT's renormalisation, misses
    design.mat by far more than its printing precision."""
    _, mat, events = feat
    visual = events[events.trial_type == "visual"]
    X = fsl_design(45, 3.0, visual, hrf="gamma", high_pass=None)["visual"].to_numpy()
    shifted = fsl_design(
        45, 3.0, visual.assign(onset=visual.onset + 1.5), hrf="gamma", high_pass=None
    )
    assert _peak_error(X, mat[:, 0]) < 1e-6
    assert _peak_error(shifted["visual"].to_numpy(), mat[:, 0]) > 1e-2
    kernel = feat_kernel("gamma")
    stimulus = np.zeros(2700)
    for onset, duration in zip(visual.onset, visual.duration, strict=True):
        stimulus[round(onset / 0.05) : round((onset + duration) / 0.05)] = 1.0
    plain = np.convolve(stimulus, kernel / kernel.sum())[:2700][np.arange(45) * 60 + 30]
    assert _peak_error(plain - plain.mean(), mat[:, 0]) > 1e-2


def test_highpass_is_a_gaussian_weighted_running_line() -> None:
    """Each scan minus the intercept of ``numpy.polyfit``'s weighted line over the scans
    within 3 sigma (polyfit weights multiply residuals: sqrt of the Gaussian); float64
    round-off only, 1e-10."""
    rng = np.random.default_rng(0)
    y = rng.standard_normal(60).cumsum()
    sigma = 100 / (2 * 2.0)
    mine = fsl_highpass_matrix(60, sigma) @ y
    half = int(3 * sigma)
    for t in (0, 5, 30, 59):
        tt = np.arange(max(t - half, 0), min(t + half, 59) + 1)
        w = np.exp(-0.5 * (tt - t) ** 2 / sigma**2)
        intercept = np.polyfit(tt - t, y[tt], 1, w=np.sqrt(w))[1]
        assert abs(mine[t] - (y[t] - intercept)) < 1e-10


def test_highpass_removes_lines_keeps_fast_signal_and_runs_lazily() -> None:
    n, tr = 200, 2.0
    t = np.arange(n) * tr
    fast = np.sin(2 * np.pi * t / 12.0)  # 12 s period, far above the 100 s cut-off
    data = np.column_stack([5 + 0.1 * t, fast, fast + 3 + 0.01 * t])
    out = fsl_highpass_filter(data, tr, 100.0, keep_mean=False)
    np.testing.assert_allclose(out[:, 0], 0, atol=1e-10)
    assert np.abs(out[20:-20, 1] - fast[20:-20]).max() < 0.05  # seen 0.022
    np.testing.assert_allclose(out[:, 2], out[:, 1], atol=1e-10)
    kept = fsl_highpass_filter(data, tr, 100.0)
    np.testing.assert_allclose(kept, out + data.mean(axis=0), atol=1e-12)  # FEAT's -add mean
    lazy = fsl_highpass_filter(da.from_array(data, chunks=(37, 2)), tr, 100.0)
    assert isinstance(lazy, da.Array)
    np.testing.assert_allclose(lazy.compute(), kept, atol=1e-12)


def test_design_highpass_filters_the_evs_as_the_data() -> None:
    """With high_pass, the EVs are the unfiltered EVs through the same filter (then
    demeaned), so a fit of filtered data on this design is FEAT's model."""
    ev = pd.DataFrame({"onset": [10.0, 100.0, 190.0], "duration": 20.0, "trial_type": "go"})
    raw = fsl_design(120, 2.0, ev, high_pass=None)["go"].to_numpy()
    filtered = fsl_design(120, 2.0, ev, high_pass=60.0)["go"].to_numpy()
    expected = fsl_highpass_matrix(120, 60.0 / 4.0) @ raw
    np.testing.assert_allclose(filtered, expected - expected.mean(), atol=1e-12)
    assert np.abs(filtered - raw).max() > 1e-2


def test_derivative_and_orthogonalise_are_orthogonal() -> None:
    ev = pd.DataFrame(
        {"onset": [10.0, 50.0, 30.0, 70.0], "duration": 10.0, "trial_type": ["a", "a", "b", "b"]}
    )
    X = fsl_design(60, 2.0, ev, derivative=True, orthogonalise={"a": ["b"]})
    assert abs(X["a"] @ X["b"]) < 1e-10 * (X["a"] @ X["a"])
    assert abs(X["a"] @ X["a_derivative"]) > 1e-3  # a changed after its derivative was made
    assert abs(X["b"] @ X["b_derivative"]) < 1e-10 * (X["b"] @ X["b"])
    plain = fsl_design(60, 2.0, ev, derivative=True)
    np.testing.assert_allclose(X["b"], plain["b"])


def test_double_gamma_is_feat_default_and_peaks_near_5s() -> None:
    kernel = feat_kernel()
    assert kernel.size == 720  # 36 s at 0.05 s
    assert 4.5 < np.argmax(kernel) * 0.05 < 5.5 and kernel.min() < 0


def test_bad_options_raise_design_error() -> None:
    with pytest.raises(DesignError, match="not a FEAT convolution"):
        fsl_design(10, 2.0, hrf="glover")  # type: ignore[arg-type]
    ev = pd.DataFrame({"onset": [0.0], "duration": [1.0], "trial_type": "a"})
    with pytest.raises(DesignError, match="lacks"):
        fsl_design(10, 2.0, ev, orthogonalise={"a": ["nope"]})
    with pytest.raises(DesignError, match=r"did you mean 100 s\?"):
        fsl_design(10, 2.0, ev, high_pass=0.01)
    with pytest.raises(DesignError, match="unknown design option"):
        make_run_design(10, 2.0, events=ev, convention="fsl", microtime_resolution=16)


def test_bad_events_get_one_message_each() -> None:
    """The same event checks as the SPM convention: a missing timing column and a negative
    duration are refused, naming the column or the row."""
    with pytest.raises(DesignError, match=r"no column 'duration'.*fsl convention needs"):
        fsl_design(10, 2.0, pd.DataFrame({"onset": [0.0], "trial_type": "a"}))
    bad = pd.DataFrame({"onset": [0.0, 4.0], "duration": [1.0, -2.0], "trial_type": "a"})
    with pytest.raises(DesignError, match="negative duration in row 1"):
        fsl_design(10, 2.0, bad)
