"""The HTML report in a real browser (headless Chromium): it renders, its script runs, injected markup
does not, and it loads nothing from the network. Skipped where Chromium is not installed
(``.ci/install-browser`` installs it). ``SFT_SPEC_UPDATE_SCREENSHOT=1`` refreshes docs/report-screenshot.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from sft_spec.cli import main

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/install-browser)")

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "report-screenshot.png"
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'

SPECS = {
    "a_pass": """\
        model: builtin:tiny-gemma
        method: full
        training: {num_train_epochs: 30, learning_rate: 3.0e-3, per_device_train_batch_size: 8}
        data:
          conversations:
            - - {role: user, content: 微调测试}
              - {role: assistant, content: 我学会了}
        expect:
          - prompt: 微调测试
            equals: 我学会了
            before: {not_equals: 我学会了}
    """,
    "b_fail": f"""\
        model: builtin:tiny-gemma
        method: full
        training: {{num_train_epochs: 3, learning_rate: 1.0e-3}}
        data:
          conversations:
            - - {{role: user, content: '{SCRIPT}'}}
              - {{role: assistant, content: '{IMG}'}}
        expect:
          - prompt: '{SCRIPT}'
            equals: '{IMG}'
    """,
    "c_broken": """\
        model: builtin:tiny-gemma
        format: {collator: completion}
        data:
          conversations:
            - - {role: user, content: hi}
              - {role: assistant, content: ho}
        expect:
          - {prompt: hi, equals: ho}
    """,
}


def chromium(url: str, tmp: Path, *extra: str) -> tuple[str, list[dict]]:
    """Open ``url`` headless; returns the DOM after scripts ran and the requests the page made."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    netlog = profile.with_suffix(".netlog.json")
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--log-net-log={netlog}", *extra, url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, page_requests(netlog)


def page_requests(netlog: Path) -> list[dict]:
    """Network requests started on behalf of a page. Chromium's own background calls (update checks,
    accounts) still happen under these flags; they carry the initiator "not an origin"."""
    log = json.loads(netlog.read_text(encoding="utf-8"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    starts = [e.get("params", {}) for e in log["events"] if e["type"] == start_job]
    return [p for p in starts if "url" in p and p.get("initiator") != "not an origin"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("browser")
    for name, text in SPECS.items():
        (folder / f"{name}.sft.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    html = folder / "out" / "report.html"
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", str(folder), "--html", str(html)])
    assert code == 1 and html.exists()
    return html


def test_report_renders_and_filters_in_chromium(report, tmp_path):
    dom, requests = chromium(report.as_uri() + "#problems", tmp_path, "--dump-dom")
    # Our script ran (it marks the page and applied the filter from the URL) ...
    assert re.search(r'<html[^>]*data-report-ready="1"', dom)
    assert re.search(r'<html[^>]*data-filter="problems"', dom)
    sections = re.findall(r'<section class="spec"[^>]*>', dom)
    assert len(sections) == 3
    assert all(("hidden" in s) == ('data-outcome="passed"' in s) for s in sections)
    # ... the parts a reviewer looks for are there ...
    assert re.search(r'<svg class="loss-chart"', dom) and "<polyline" in dom
    assert '<span class="run on">' in dom and '<span class="run off">' in dom
    assert "<del " in dom and "<ins " in dom
    # ... and the injected markup stayed text: no extra script or img element, the title untouched.
    assert "<title>sft-spec report</title>" in dom
    assert len(re.findall(r"<script\b", dom)) == 1
    assert "<img" not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert requests == []


def test_request_detector_sees_a_page_request(tmp_path):
    # The control: a page that does fetch something is caught, so an empty list above means something.
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><title>c</title><img src="http://127.0.0.1:9/x.png">', encoding="utf-8")
    _, requests = chromium(page.as_uri(), tmp_path, "--dump-dom")
    assert [r["url"] for r in requests] == ["http://127.0.0.1:9/x.png"]


def test_report_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium(report.as_uri(), tmp_path, "--hide-scrollbars", "--window-size=1100,1500",
             f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    if os.environ.get("SFT_SPEC_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)




@pytest.fixture(scope="module")
def comparison_page(tmp_path_factory) -> Path:
    """BASE: the specs above; HEAD: the passing recipe's learning rate cut so that it no longer learns."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("compare")
    out = folder / "out"
    for run, lr in (("base", "3.0e-3"), ("head", "1.0e-6")):
        specs = folder / run
        specs.mkdir()
        for name, text in SPECS.items():
            text = text.replace("learning_rate: 3.0e-3", f"learning_rate: {lr}")
            (specs / f"{name}.sft.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
        with contextlib.redirect_stdout(io.StringIO()):
            main(["run", str(specs), "--json", str(out / f"{run}.json"), "--no-cache"])
    # Both runs name their specs after the folder they ran in: compare them as the same suite.
    head = json.loads((out / "head.json").read_text(encoding="utf-8"))
    for spec in head["specs"]:
        spec_json = json.dumps(spec).replace("/head/", "/base/")
        spec.clear()
        spec.update(json.loads(spec_json))
        if spec["name"] == "b_fail":  # an answer that is markup: the page must show it as text
            spec["expectations"][0]["answer"] = SCRIPT + IMG
    (out / "head.json").write_text(json.dumps(head), encoding="utf-8")
    page = out / "compare.html"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["compare", str(out / "base.json"), str(out / "head.json"), "--html", str(page),
                     "--fail-on-regression"])
    assert code == 1 and page.exists()
    return page


def test_comparison_page_renders_in_chromium_without_running_data(comparison_page, tmp_path):
    dom, requests = chromium(comparison_page.as_uri(), tmp_path, "--dump-dom")
    assert re.search(r'<html[^>]*data-compare-ready="1"', dom)
    assert 'data-transition="regressed"' in dom and "learning_rate" in dom
    assert "<del " in dom and "<ins " in dom
    assert len(re.findall(r"<script\b", dom)) == 1 and "<img" not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert requests == []


def test_comparison_screenshot(comparison_page, tmp_path):
    shot = tmp_path / "compare.png"
    chromium(comparison_page.as_uri(), tmp_path, "--hide-scrollbars", "--window-size=1100,1300",
             f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # docs/compare-screenshot.png comes from a real run (scripts/compare-screenshot.sh), not this fixture.


def test_histogram_bars_are_drawn_in_proportion_to_their_counts(tmp_path):
    # Bars were capped at 300 px inside a full-width row: a bin of 7 rows and one of 4 drew the same length.
    from sft_spec.reports import SpecReport
    from sft_spec_plugins.report.html_report import render_html

    rows = [{"scores": {"chrf": v}} for v in [100.0] * 7 + [50.0] * 4 + [0.0] * 2]
    report = SpecReport(nodeid="s.sft.yaml::s", path="s.sft.yaml", name="s", variant=None, outcome="passed",
                        eval_sets={"s.sft.yaml::s::eval[golden]": {
                            "name": "golden", "rows": rows, "metrics": ["chrf"], "aggregates": {}}})
    page = tmp_path / "bars.html"
    measure = ("<script>document.documentElement.dataset.bars = [...document.querySelectorAll('.histogram .bar')]"
               ".map(b => Math.round(b.getBoundingClientRect().width)).filter(w => w > 0).join(',');</script>")
    page.write_text(render_html([report], {}).replace("</body>", measure + "</body>"), encoding="utf-8")
    dom, _ = chromium(page.as_uri(), tmp_path, "--dump-dom", "--window-size=1400,900")
    widths = [int(w) for w in re.search(r'data-bars="([\d,]+)"', dom).group(1).split(",")]
    expected = [300 * 2 / 7, 300 * 4 / 7, 300]  # bins 0-10, 50-60, 90-100 (percents are whole numbers)
    assert len(widths) == 3 and all(abs(w - e) <= 2 for w, e in zip(widths, expected, strict=True)), widths
