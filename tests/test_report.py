"""`shadow report` on a recorded real vLLM stream, rendered by headless Chromium: one self-contained page with
its recommendation (or the reason for none), evidence, fidelity and four inlined figures."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from tests import deploy_support, shadow_support
from vllm_shadow.cli.main import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    stream = shadow_support.STREAMS / "fcfs-kv12.jsonl.gz"
    assert main(["report", str(stream), "-o", str(out), "--optimal-time-limit", "0.5"]) == 0
    return out


def test_the_page_is_self_contained(report: Path) -> None:
    html = report.read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", html)  # nothing fetched: every figure is a data: URI
    assert html.count('src="data:image/png;base64,') == 4
    assert "4786" not in html and "fcfs-kv12.jsonl.gz" in html


def test_the_headline_is_the_bound_at_equal_latency(report: Path) -> None:
    """The optimal paragraph names the bound an operator can act on first, and says which one ignores latency;
    the bound at equal latency is never below the one with latency ignored (a tighter problem)."""
    html = report.read_text()
    paragraph = re.search(r'<p id="optimal">(.*?)</p>', html, re.S)
    assert paragraph is not None
    text = paragraph.group(1)
    assert text.index("Optimal at equal latency") < text.index("latency ignored")
    assert "the engine&#x27;s configuration (self replay)" in text
    at_most = float(re.search(r"a saving of at most <b>([\d.]+)%</b>", text).group(1))
    ignored = float(re.search(r"the bound is ([\d.]+)% below", text).group(1))
    assert 0 <= at_most <= ignored


def test_chromium_renders_the_key_elements_and_a_non_blank_screenshot(report: Path, tmp_path: Path) -> None:
    chromium = deploy_support.require("chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2400"]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    for element in ("recommendation", "optimal", "evidence", "fidelity", "latency", "gap", "kv", "schedule"):
        assert f'id="{element}"' in dom, element
    assert re.search(r"reproduced <b>(\d+) of\s+\1</b>", dom), "the recorded stream replays step for step"
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120
    )
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1280) and pixels.std() > 0.05  # figures drawn, not a blank page
