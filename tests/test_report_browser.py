"""The report page as a reader sees it: rendered by headless Chromium (skipped where none is installed).

CI has no browser; run it with ``apt-get install chromium`` (Debian) and
``python -m pytest -m slow tests/test_report_browser.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report_command import make_run

import processes
from ilseg.reports import write_report

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
def test_the_page_renders_offline_with_its_figures(tmp_path: Path):
    runs = [make_run(tmp_path / "runs" / f"ilt-{s}", "ilt", s, (0.4 + 0.05 * s, 0.1), (0.6, 0.2)) for s in range(2)]
    runs.append(make_run(tmp_path / "runs" / "ft", "finetune", 0, (0.1, 0.4), (0.6, 0.05)))
    page = write_report(runs, tmp_path / "report")["html"]
    shot = tmp_path / "page.png"
    processes.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,1800", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    # the embedded figures were drawn: the first Okabe-Ito colour (#0072B2) of the lines and bars is on screen
    blue = np.abs(pixels.astype(int) - [0x00, 0x72, 0xB2]).sum(1) < 30
    assert blue.sum() > 500
    assert (pixels.min(1) < 128).mean() > 0.01  # text and figures, not a blank page


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
@pytest.mark.parametrize("preset, classes", [("voc-15-1-ov-ilt", 21), ("ade-100-5-ov-ilt", 151)])
def test_reports_of_real_sizes_render_on_wide_and_narrow_windows(tmp_path: Path, preset: str, classes: int):
    """The VOC 15-1 and ADE20k 100-5 pages (docs/reports.md has what was looked at, and the verdicts)."""
    from report_runs import make_task_run

    runs = [make_task_run(tmp_path / "runs" / f"ilt-{s}", preset, "ilt", s) for s in range(2)]
    runs.append(make_task_run(tmp_path / "runs" / "ft", preset, "finetune", 0, quality=0.4))
    page = write_report(runs, tmp_path / "report")["html"]
    for width in (1280, 400):
        shot = tmp_path / f"page-{width}.png"
        processes.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},3000", f"--screenshot={shot}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        assert pixels.shape[1] == width
        # the method colours of the lines (ILT's orange #E69F00) and the heatmaps' grey "not learnt" cells
        orange = np.abs(pixels.reshape(-1, 3).astype(int) - [0xE6, 0x9F, 0x00]).sum(1) < 30
        grey = (pixels.reshape(-1, 3) == [0xD9, 0xD9, 0xD9]).all(1)
        assert orange.sum() > 100 and grey.sum() > 1000, (width, orange.sum(), grey.sum())
