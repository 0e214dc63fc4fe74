"""The HTML report rendered in headless Chromium: the gallery shows the expected pairs, the filter (read from
the URL hash) hides the others, and a screenshot of the filtered page is kept in tests/artifacts/."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from manifests.html_report import write_html_report

pytest_plugins = ["tests.conftest_cli"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(BROWSER is None, reason="needs Chromium (Debian: apt-get install -y chromium)")]


def chromium(url: str, profile: Path, *args: str) -> str:
    done = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={profile}", *args, url], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def visible_cards(dom: str) -> list[str]:
    cards = re.findall(r"<figure class=\"card[^>]*>", dom)
    return [c for c in cards if not re.search(r"\shidden(=|\s|>)", c)]


@pytest.fixture(scope="module")
def report(small_run, tmp_path_factory) -> Path:
    return write_html_report(small_run, tmp_path_factory.mktemp("report") / "report.html")


def test_gallery_shows_every_selected_pair(report, expected_gallery, tmp_path):
    dom = chromium(report.as_uri(), tmp_path / "profile", "--dump-dom")
    total = expected_gallery(per_group=8)
    assert len(visible_cards(dom)) == total > 30
    assert re.search(rf'id="shown">{total}<', dom)


@pytest.mark.parametrize("view", [{"task": "subject_removal", "decision": "rejected"}, {"task": "style_change"},
                                  {"decision": "rejected", "reason": "no_op_edit"}, {"task": "text_change"}])
def test_filter_from_the_url_hash(report, expected_gallery, tmp_path, view):
    fragment = "&".join(f"{k}={v}" for k, v in view.items())
    dom = chromium(f"{report.as_uri()}#{fragment}", tmp_path / "profile", "--dump-dom")
    cards = visible_cards(dom)
    assert len(cards) == expected_gallery(per_group=8, **view)
    for card in cards:
        assert all(f'data-{k}="{v}"' in card for k, v in view.items())


def test_screenshot_of_a_filtered_report(report, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-subject_removal.png"
    shot.unlink(missing_ok=True)
    chromium(f"{report.as_uri()}#task=subject_removal", tmp_path / "profile", "--window-size=1280,2400",
             f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
