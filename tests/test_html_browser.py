"""The static HTML report opened in headless Chromium: it renders, with every expected section.

Chromium is installed by `make test` (the `browser` target) where it is missing and we are root;
where it cannot be, this test skips with that message.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from judge3d.adapt.arms import arm_names
from report_fixture import build_repo, run_stages

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not found (Debian package 'chromium'; `make test` installs it when run as root)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("html") / "repo"
    params = build_repo(root, arm_gain={"repair_severe": 0.3}, diverged=("dpo_strong",), calibration_ok=False)
    run_stages(root, params)
    return root / "reports/report.html", params


def _run(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium_with_sections(report, tmp_path):
    browser = chromium()
    html_path, params = report
    proc = _run(browser, tmp_path, "--dump-dom", html_path.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    for section in ("calibration", "study-table", "severity-table", "plots", "gallery"):
        assert re.search(rf'<section id="{section}"', dom), section
    for arm in arm_names(params):
        assert f'id="gallery-{arm}"' in dom
    assert dom.count("<svg") == 3 and "<table" in dom
    assert 'class="unreliable"' in dom and "DIVERGED" in dom


def test_report_screenshot_is_not_blank(report, tmp_path):
    browser = chromium()
    html_path, _ = report
    shot = tmp_path / "report.png"
    proc = _run(browser, tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", html_path.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    # text, tables, bars and thumbnails: many non-white pixels and more than a handful of colours
    assert (img.min(axis=2) < 200).mean() > 0.02
    assert len(np.unique(img.reshape(-1, 3)[::97], axis=0)) > 20
