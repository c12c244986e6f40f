"""The JSON, JUnit XML and HTML reporters, on one real run of the tiny model with every kind of outcome."""

from __future__ import annotations

import json
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import load_schema, validate

from sft_spec import hookimpl
from sft_spec.cli import main
from sft_spec.reports import SpecReport
from sft_spec_plugins.report.html_report import loss_chart, token_runs
from sft_spec_plugins.report.json_report import load_document, report_from_dict
from sft_spec_plugins.report.junitxml import classname, xml_text

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'

PASSING = """\
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
    checks:
      loss_decreased: true
"""

# Trains 2 steps: it cannot learn the answer, so the check fails and the report shows a diff.
INJECTION = f"""\
    model: builtin:tiny-gemma
    method: full
    training: {{num_train_epochs: 2, learning_rate: 1.0e-3}}
    data:
      conversations:
        - - {{role: user, content: '{SCRIPT}'}}
          - {{role: assistant, content: '{IMG}'}}
    expect:
      - prompt: '{SCRIPT}'
        equals: '{IMG}'
"""

BROKEN = """\
    model: builtin:tiny-gemma
    format: {collator: completion}
    data:
      conversations:
        - - {role: user, content: hi}
          - {role: assistant, content: ho}
    expect:
      - {prompt: hi, equals: ho}
"""

SKIPPED = """\
    skip: needs a GPU
    model: builtin:tiny-gemma
    data:
      conversations:
        - - {role: user, content: hi}
          - {role: assistant, content: ho}
    expect:
      - {prompt: hi, equals: ho}
"""

XFAIL = """\
    xfail: one step cannot teach it
    model: builtin:tiny-gemma
    method: full
    training: {num_train_epochs: 1}
    data:
      conversations:
        - - {role: user, content: hi}
          - {role: assistant, content: ho}
    expect:
      - {prompt: hi, equals: ho}
"""


class Snooper:
    """Reads the JSON file while the run is still going, to prove it is written as results arrive."""

    def __init__(self, path: Path):
        self.path = path
        self.seen: list[dict] = []

    @hookimpl
    def sft_spec_run_progress(self, item, phase, step, total, loss):
        if phase == "load" and self.path.exists():
            self.seen.append(json.loads(self.path.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run with a passing, a failing (script injection), a broken, a skipped and an xfail spec."""
    folder = tmp_path_factory.mktemp("reports")
    specs = folder / "specs"
    specs.mkdir()
    for name, text in (("a_pass", PASSING), ("b_inject", INJECTION), ("c_broken", BROKEN),
                       ("d_skip", SKIPPED), ("e_xfail", XFAIL)):
        (specs / f"{name}.sft.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    out = folder / "out"
    snooper = Snooper(out / "results.json")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", str(specs), "--json", str(out / "results.json"), "--junitxml",
                     str(out / "junit.xml"), "--html", str(out / "report.html")], plugins=[snooper])
    return {"code": code, "out": out, "stdout": stdout.getvalue(), "snooper": snooper, "folder": folder}


def test_validator_rejects_what_the_schema_forbids(run):
    schema = load_schema()
    doc = json.loads((run["out"] / "results.json").read_text(encoding="utf-8"))
    assert validate(doc, schema) == []
    bad = json.loads(json.dumps(doc))
    bad["schema_version"] = 3
    del bad["environment"]["packages"]["torch"]
    spec = next(s for s in bad["specs"] if s["outcome"] == "passed")
    spec["outcome"] = "green"
    spec["expectations"][0]["checks"][0]["passed"] = "yes"
    spec["mask"] = {"tokens": "not a list"}
    errors = "\n".join(validate(bad, schema))
    for fragment in ("$.schema_version", "'torch'", "'green'", ".checks[0].passed", "].mask"):
        assert fragment in errors


# -- JSON ---------------------------------------------------------------------------------------------


def test_json_report_holds_every_result(run):
    assert run["code"] == 1
    doc = json.loads((run["out"] / "results.json").read_text(encoding="utf-8"))
    assert validate(doc, load_schema()) == []
    assert doc["schema_version"] == 2 and doc["complete"] is True and doc["exitstatus"] == 1
    assert doc["command"][:2] == ["sft-spec", "run"] and "--json" in doc["command"]
    env = doc["environment"]
    assert env["device"] == "cpu"
    assert all(env["packages"][name] for name in ("torch", "transformers", "trl", "peft", "sft-spec"))
    outcomes = {Path(s["path"]).name: s["outcome"] for s in doc["specs"]}
    assert outcomes == {"c_broken.sft.yaml": "error", "a_pass.sft.yaml": "passed",
                        "b_inject.sft.yaml": "failed", "d_skip.sft.yaml": "skipped",
                        "e_xfail.sft.yaml": "xfailed"}
    assert doc["summary"]["outcomes"] == {"error": 1, "passed": 2, "failed": 1, "skipped": 1, "xfailed": 1}
    passing = next(s for s in doc["specs"] if s["outcome"] == "passed")
    assert len(passing["losses"]) == passing["metrics"]["steps"] == 30
    assert passing["settings"]["training"]["learning_rate"] == 3.0e-3
    assert set(passing["phases"]) >= {"load", "train", "generate"}
    case = passing["expectations"][0]
    assert case["answer"] == "我学会了" and case["base_answer"] not in (None, "我学会了")
    assert [c["on"] for c in case["checks"]] == ["before", "after"]
    # Byte-level tokens of one character are decoded together: the text reads as the model saw it.
    mask = passing["mask"]
    assert "\ufffd" not in "".join(mask["tokens"])
    assert mask["trained_text"].startswith("我学会了<end_of_turn>")
    untrained = "".join(t for t, on in zip(mask["tokens"], mask["trained"], strict=True) if not on)
    assert untrained.endswith("<start_of_turn>model\n")
    broken = next(s for s in doc["specs"] if s["outcome"] == "error")
    assert broken["error"]["location"].endswith("c_broken.sft.yaml:2:10")
    assert "Did you mean: completion_only?" in broken["error"]["message"]


def test_json_is_written_as_results_arrive(run):
    # Read at each spec's start: never complete, and each time holding the specs finished so far.
    seen = run["snooper"].seen
    assert len(seen) == 3  # the pass, inject and xfail specs load a model
    assert all(doc["complete"] is False and doc["exitstatus"] is None for doc in seen)
    # The broken spec is reported before any spec runs; the skipped one loads nothing.
    assert [len(doc["specs"]) for doc in seen] == [1, 2, 4]


def test_reports_round_trip_through_json(run):
    meta, reports = load_document(run["out"] / "results.json")
    assert meta["schema_version"] == 2 and "specs" not in meta
    assert all(isinstance(r, SpecReport) for r in reports)
    passing = next(r for r in reports if r.outcome == "passed")
    assert passing.mask is not None and passing.mask.tokens
    assert passing.expectations[0].checks[1].expected == "我学会了"
    assert report_from_dict(passing.to_dict()) == passing
    assert report_from_dict({**passing.to_dict(), "added_in_a_later_writer": 1}) == passing


def test_report_command_rerenders_without_training(run, tmp_path, capsys):
    html, xml = tmp_path / "again.html", tmp_path / "again.xml"
    code = main(["report", str(run["out"] / "results.json"), "--html", str(html), "--junitxml", str(xml)])
    assert code == 0
    assert f"HTML report: {html}" in capsys.readouterr().out
    original = ET.parse(run["out"] / "junit.xml").getroot()
    again = ET.parse(xml).getroot()
    for root in (original, again):
        root.attrib.pop("time")  # the run's file is timed a few milliseconds after the JSON
    assert ET.tostring(again) == ET.tostring(original)
    text = html.read_text(encoding="utf-8")
    assert text.count('<section class="spec"') == 5 and 'class="loss-chart"' in text


def test_report_command_refuses_unknown_files(tmp_path, capsys):
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"schema_version": 99, "specs": []}), encoding="utf-8")
    assert main(["report", str(future), "--html", str(tmp_path / "x.html")]) == 4
    assert "schema_version 99 is not supported" in capsys.readouterr().err
    assert main(["report", str(future)]) == 4  # the version is checked before anything is shown
    assert "schema_version 99 is not supported" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json"), "--html", str(tmp_path / "x.html")]) == 4
    assert not (tmp_path / "x.html").exists()


# -- JUnit XML -----------------------------------------------------------------------------------------

# What the common JUnit schema (Jenkins' junit-10.xsd, read by GitLab and GitHub actions) allows.
ALLOWED_CHILDREN = {
    "testsuites": {"testsuite"},
    "testsuite": {"properties", "testcase", "system-out", "system-err"},
    "properties": {"property"},
    "property": set(),
    "testcase": {"skipped", "error", "failure", "system-out", "system-err"},
    "skipped": set(), "error": set(), "failure": set(), "system-out": set(), "system-err": set(),
}
REQUIRED_ATTRS = {"testsuite": {"name", "tests", "failures", "errors", "skipped", "time"},
                  "testcase": {"name", "classname", "time"}, "property": {"name", "value"}}


def test_junitxml_follows_the_common_schema(run):
    root = ET.parse(run["out"] / "junit.xml").getroot()
    assert root.tag == "testsuites"
    for element in root.iter():
        assert {child.tag for child in element} <= ALLOWED_CHILDREN[element.tag], element.tag
        assert REQUIRED_ATTRS.get(element.tag, set()) <= set(element.attrib), element.tag
    float(root.get("time"))
    suites = root.findall("testsuite")
    assert len(suites) == 5
    for suite in suites:
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        for tag, attr in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            assert int(suite.get(attr)) == sum(1 for c in cases if c.find(tag) is not None)
    totals = {a: sum(int(s.get(a)) for s in suites) for a in ("tests", "failures", "errors", "skipped")}
    assert totals == {"tests": 6, "failures": 1, "errors": 1, "skipped": 2}
    assert {a: int(root.get(a)) for a in totals} == totals


def test_junitxml_cases_read_like_pytest(run):
    root = ET.parse(run["out"] / "junit.xml").getroot()
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    prefix = str(run["folder"] / "specs").lstrip("/").replace("/", ".")
    passed = cases[(f"{prefix}.a_pass", "a_pass::expect[0]")]
    assert list(passed) == []
    assert (f"{prefix}.a_pass", "a_pass::checks[loss_decreased]") in cases
    failure = cases[(f"{prefix}.b_inject", "b_inject::expect[0]")].find("failure")
    assert failure.get("message").startswith("equals (after training): ")
    assert "[-" in failure.get("message") and "{+" in failure.get("message")  # the character diff
    assert f"prompt:   {SCRIPT}" in failure.text and "diff:" in failure.text
    error = cases[(f"{prefix}.c_broken", "c_broken.sft.yaml")].find("error")
    assert "unknown collator 'completion'" in error.get("message")
    assert error.get("type") == "sft_spec.error.collect"
    skipped = cases[(f"{prefix}.d_skip", "d_skip::expect[0]")].find("skipped")
    assert skipped.get("message") == "needs a GPU"
    xfailed = cases[(f"{prefix}.e_xfail", "e_xfail::expect[0]")].find("skipped")
    assert xfailed.get("message") == "expected failure: one step cannot teach it"
    suite = next(s for s in root.findall("testsuite") if s.get("name").endswith("a_pass"))
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["model"] == "builtin:tiny-gemma" and props["method"] == "full" and props["steps"] == "30"
    assert float(props["final_loss"]) < 1.0 and float(props["train_seconds"]) > 0
    assert int(props["trainable_parameters"]) > 0


def test_junit_names_and_illegal_characters():
    assert classname("specs/blog-recipe.sft.yaml") == "specs.blog-recipe"
    assert classname("./a/b.sft.yml") == "a.b"
    # Random models answer with control characters, which XML 1.0 cannot hold at all.
    assert xml_text("a\x18b\x00c\td\n") == "a\\x18b\\x00c\td\n"
    ET.fromstring(f"<a>{xml_text(chr(0x18))}</a>")


# -- HTML -------------------------------------------------------------------------------------------


def test_html_escapes_everything_from_specs_data_and_model(run):
    text = (run["out"] / "report.html").read_text(encoding="utf-8")
    assert SCRIPT not in text and "<img" not in text and "onerror=alert(1)>" not in text
    assert text.count("<script") == 1  # the report's own, at the end
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in text
    assert "default-src 'none'" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)


def test_html_shows_what_a_reviewer_needs(run):
    text = (run["out"] / "report.html").read_text(encoding="utf-8")
    assert text.count('<section class="spec"') == 5
    assert 'data-filter="problems"' in text
    assert 'data-outcome="failed"' in text and 'data-outcome="error"' in text
    assert "--junitxml" in text and "transformers 5." in text and "<td>cpu</td>" in text
    # The loss-carrying tokens are highlighted, one span per token with its index on hover.
    assert re.search(r'<span class="run on"><span class="tok" title="tokens \d+-\d+ \(one character, 3 byte '
                     r'tokens\): &#39;我&#39;, carries the loss">我</span>', text)
    assert '<span class="run off">' in text
    assert text.count('class="loss-chart"') == 3 and "<polyline" in text and "log scale" in text
    assert "<del " in text and "<ins " in text
    assert "c_broken.sft.yaml:2:10" in text and "error in phase collect" in text
    assert "needs a GPU" in text and "one step cannot teach it" in text
    assert "learning_rate" in text


def test_terminal_summary_names_the_reports(run):
    out = run["out"]
    for line in (f"JSON report: {out / 'results.json'}", f"JUnit XML report: {out / 'junit.xml'}",
                 f"HTML report: {out / 'report.html'}"):
        assert line in run["stdout"]


def test_html_pieces():
    runs = token_runs(["<bos>", "hi", "", "", "我", "<eos>"], [False, False, True, True, True, True])
    assert [(r.trained, [t.text for t in r.tokens]) for r in runs] == [(False, ["<bos>", "hi"]),
                                                                        (True, ["我", "<eos>"])]
    assert runs[1].tokens[0].title.startswith("tokens 2-4 (one character, 3 byte tokens)")
    gentle = loss_chart([3.0, 2.0, 1.5])
    assert gentle is not None and len(gentle.points) == 3
    assert gentle.points[0][1] < gentle.points[-1][1]  # SVG y grows downwards: a falling loss goes down
    steep = loss_chart([8.0, float("nan"), 0.01, 0.0001])
    assert steep is not None and steep.log and [p[2] for p in steep.points] == [1, 3, 4]
    assert loss_chart([float("nan")]) is None
    signed = loss_chart([1.0, -0.5])  # a loss at or below zero has no log axis
    assert signed is not None and not signed.log


def test_two_reports_draw_their_losses_on_the_same_axes():
    # One report's axis ran 0-16 and the next 0-100 (log in one, linear in the other): not comparable by eye.
    a, b = loss_chart([3.0, 2.0, 1.5]), loss_chart([9.0, 0.4, 0.05])
    assert a.log and b.log and a.yticks == b.yticks
    assert [label for _, label in a.yticks] == ["1e-2", "1e-1", "1", "10"]
    assert loss_chart([200.0, 0.001]).yticks[-1][1] == "1e3"  # widened, never clipped


def test_a_bounded_metric_is_binned_over_its_own_range_and_bars_share_one_scale():
    from sft_spec_plugins.report.html_report import histogram

    bins = histogram([100.0] * 7 + [0.0] * 2, low=0.0, high=100.0)
    assert [b["label"] for b in bins][:2] == ["0-10", "10-20"] and len(bins) == 10
    assert [b["count"] for b in bins] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 7]
    assert [b["percent"] for b in bins if b["count"]] == [29, 100]  # 2 of 7 draws 29% of 7's length
    assert histogram([55.0, 56.0], low=0.0, high=100.0)[5]["count"] == 2  # the same bins for other values
    from sft_spec_plugins.common.uncertainty import Estimate
    from sft_spec_plugins.report.html_report import _error_bar

    bar = _error_bar(Estimate(value=55.5, low=50.0, high=61.0), [55.0, 56.0], 0.0, 100.0)
    assert (bar["low"], bar["mean"], bar["high"]) == (50.0, 55.5, 61.0)  # on the bins' 0-100 axis


# -- runs that fail or stop ----------------------------------------------------------------------------


class InterruptOnLoad:
    """Ctrl-C while the first spec loads its model."""

    @hookimpl(tryfirst=True)
    def sft_spec_load_model(self, item, config):
        raise KeyboardInterrupt


def test_reports_are_written_when_the_run_is_interrupted(tmp_path, capsys):
    for name, text in (("a_broken", BROKEN), ("b_pass", PASSING), ("c_pass", PASSING)):
        (tmp_path / f"{name}.sft.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    out = tmp_path / "out"
    code = main(["run", str(tmp_path), "--json", str(out / "r.json"), "--junitxml", str(out / "r.xml"),
                 "--html", str(out / "r.html")], plugins=[InterruptOnLoad()])
    assert code == 2
    assert "JSON report:" in capsys.readouterr().out
    doc = json.loads((out / "r.json").read_text(encoding="utf-8"))
    assert doc["interrupted"] is True and doc["exitstatus"] == 2 and doc["complete"] is True
    assert [s["outcome"] for s in doc["specs"]] == ["error", "interrupted"]  # c_pass never started
    root = ET.parse(out / "r.xml").getroot()
    assert root.get("errors") == "2" and root.get("tests") == "2"
    assert "interrupted" in (out / "r.html").read_text(encoding="utf-8")


def test_unwritable_report_path_is_reported_not_fatal(tmp_path, capsys):
    (tmp_path / "a.sft.yaml").write_text(textwrap.dedent(BROKEN), encoding="utf-8")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["run", str(tmp_path / "a.sft.yaml"), "--json", str(blocker / "r.json")])
    assert code == 1
    assert f"JSON report: could not write {blocker / 'r.json'}" in capsys.readouterr().out


def test_report_with_no_file_to_write_shows_the_run_as_its_terminal_did(run, capsys):
    meta, reports = load_document(run["out"] / "results.json")
    assert main(["report", str(run["out"] / "results.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("results of: ") and all(r.nodeid in out for r in reports)
    failed = [c.nodeid for r in reports for c in r.cases if c.outcome == "failed"]
    assert failed and "FAILURES" in out and all(f"FAILED {nodeid}" in out for nodeid in failed), out


def test_losses_logged_every_few_steps_are_counted_and_plotted_at_their_steps(sft, write_spec, one_answer_spec,
                                                                             tmp_path):
    text = one_answer_spec(epochs=30).replace("per_device_train_batch_size: 8}",
                                              "per_device_train_batch_size: 8, logging_steps: 5}")
    result = sft("run", write_spec("l.sft.yaml", text), "--no-cache", "-v", "--html", tmp_path / "r.html")
    assert "over 30 steps (6 logged, every 5)" in result.out, result.out
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert ">30</text>" in html and ">6</text>" not in html
