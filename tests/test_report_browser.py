"""The HTML reports in a real browser: headless Chromium (the Debian package, which
``.ci/run`` installs) loads each report, and a checker added to a copy of the page (the
reports themselves hold no script) records, once the page has loaded, how many images
there are, which failed to decode or have no size, and how many tables there are;
Chromium's console log must hold no error.

Locally the tests skip with the reason when ``chromium`` is missing; in CI (``CI=true``)
that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bigglm.config import parse_config
from bigglm.pipeline import run_analysis

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_CHECKER = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const bad = images.filter((i) => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0));
  document.body.setAttribute("data-checked", JSON.stringify({
    images: images.length,
    bad: bad.map((i) => i.alt),
    tables: document.querySelectorAll("table").length,
    headings: Array.from(document.querySelectorAll("h2")).map((h) => h.textContent),
  }));
});
</script>
"""


@pytest.fixture(autouse=True, scope="module")
def _chromium_present() -> None:
    if CHROMIUM is not None:
        return
    problem = "chromium is not installed (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser tests, but {problem}")
    pytest.skip(problem)


def _load(report: Path, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Open a checked copy of ``report`` in headless Chromium: the checker's findings and
    the console log."""
    page = tmp_path / f"checked-{report.name}"
    page.write_text(report.read_text().replace("</body>", _CHECKER + "</body>"))
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'data-checked="([^"]*)"', done.stdout)
    assert found, done.stdout[-2000:]
    checked: dict[str, Any] = json.loads(found.group(1).replace("&quot;", '"'))
    return checked, done.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and "error" in line.lower()]


@pytest.fixture(scope="module")
def reports(
    tmp_path_factory: pytest.TempPathFactory,
    make_tiny_bids: Any,
    tiny_config: Any,
    local_client: Any,
) -> dict[str, Path]:
    """A five-subject study of the tiny dataset with a permutation group level."""
    root = tmp_path_factory.mktemp("browser")
    dataset = make_tiny_bids(root / "dataset", ("01", "02", "03", "04", "05"), n_scans=40)
    group = {"inference": {"permutation": {"n_perm": 64, "cluster_threshold": 0.01}}}
    sections = {"contrasts": {"a": "a"}, "group": group}
    config = parse_config(tiny_config(dataset, root / "out", report=True, **sections))
    run_analysis(config, client=local_client)
    return {
        "first": root / "out" / "sub-01" / "sub-01_task-tiny_report.html",
        "group": root / "out" / "group" / "contrast-a" / "group_report.html",
    }


def test_group_report_loads_with_every_image_and_table(
    reports: dict[str, Path], tmp_path: Path
) -> None:
    checked, log = _load(reports["group"], tmp_path)
    assert checked["bad"] == [] and checked["images"] == 5, checked  # design, n, z x2, null
    assert checked["tables"] >= 5, checked  # facts, columns, weights, two cluster tables
    assert checked["headings"][:2] == ["Design", "Subjects present per voxel"], checked
    assert "Contrast mean" in checked["headings"], checked
    assert _console_errors(log) == [], log[-2000:]
    text = reports["group"].read_text()
    for name in ("group_contrast-mean_stat-z_statmap.nii.gz", "stat-logpmaxt"):
        assert name in text  # links to the maps written
    for target in re.findall(r'href="([^"]+)"', text):
        assert (reports["group"].parent / target).is_file(), target


def test_first_level_report_loads_with_every_image(
    reports: dict[str, Path], tmp_path: Path
) -> None:
    checked, log = _load(reports["first"], tmp_path)
    # mask; design, contrast matrix, regressor correlations; contrast a: slices, glass brain
    assert checked["bad"] == [] and checked["images"] == 6, checked
    assert checked["headings"][:4] == ["Model", "Mask", "Design matrices", "Contrasts"], checked
    assert "Contrast a" in checked["headings"], checked
    assert checked["tables"] >= 4 and _console_errors(log) == [], checked  # facts, model, VIF


def test_a_surface_report_loads_with_its_surface_figures(tmp_path: Path, local_client: Any) -> None:
    """A GIFTI study on fsaverage5: each contrast's z map on the mesh decodes and has a size."""
    from tests.test_report_surface import CONTRASTS, report_path, write_dataset

    report = report_path(write_dataset(tmp_path / "dataset", 10242), local_client)
    checked, log = _load(report, tmp_path)
    # design, contrast matrix, regressor correlations; a surface figure per contrast
    assert checked["bad"] == [] and checked["images"] == 3 + len(CONTRASTS), checked
    assert [f"Contrast {name}" for name in CONTRASTS] == checked["headings"][-2:], checked
    assert _console_errors(log) == [], log[-2000:]


def test_the_browser_check_sees_a_broken_image(reports: dict[str, Path], tmp_path: Path) -> None:
    """The control: the same report with one PNG's bytes damaged fails the check."""
    damaged = tmp_path / "damaged.html"
    text = reports["group"].read_text()
    damaged.write_text(text.replace("base64,iVBORw0K", "base64,AAAAAAAA", 1))
    checked, _ = _load(damaged, tmp_path)
    assert checked["bad"] == ["group design matrix"], checked
