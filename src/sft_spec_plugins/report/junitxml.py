"""``--junitxml PATH``: results in the JUnit XML dialect CI servers read (Jenkins, GitLab, GitHub actions).

One ``<testsuite>`` per spec and matrix entry, so that its metrics (final loss, training seconds,
trainable parameters) can be ``<properties>``, which the common JUnit schema allows on suites but not
on test cases. Inside, one ``<testcase>`` per expectation and training check, named like pytest:
``classname`` is the spec file path with dots, ``name`` the id after the file.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.reports import ExpectationReport, SpecReport

from ..common.files import output_path
from .failures import char_diff, shown_argument
from .report_files import FileReporter

#: Metrics shown as suite properties, in this order, when a spec has them.
PROPERTY_METRICS = ("final_loss", "train_seconds", "steps", "trainable_parameters", "total_parameters")

# XML 1.0 cannot hold most control characters, not even as &#..; references: a random model's answer
# often contains some, and a parser would then reject the whole file. DEL, C1 and the characters that
# reorder text are legal XML but would forge what a CI page shows: escaped too.
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff"
                          "\ud800-\udfff\ufffe\uffff]")


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return "\\r" if code == 13 else f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}"


def xml_text(value: Any) -> str:
    """Text XML can hold and a CI page shows as written: a CR (which returns to a line's start) as ``\\r``."""
    return _ILLEGAL_XML.sub(_escaped, str(value))


def classname(path: str) -> str:
    """``specs/blog-recipe.sft.yaml`` -> ``specs.blog-recipe``, as pytest names a test module."""
    stem = re.sub(r"\.sft\.ya?ml$|\.ya?ml$", "", path.replace("\\", "/"))
    return ".".join(part for part in stem.split("/") if part not in ("", "."))


def case_name(report: SpecReport, nodeid: str) -> str:
    """The id after its file part (the file is the classname); a file that did not load: its name."""
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid.rsplit("/", 1)[-1]


def _seconds(value: float) -> str:
    return f"{max(value, 0.0):.3f}"


def _failure_text(case: ExpectationReport) -> tuple[str, str]:
    """A one-line message (the first failed check, with its character diff) and the full details."""
    lines: list[str] = []
    message = ""
    if case.prompt:
        prompt = case.prompt[-1]["content"] if len(case.prompt) == 1 else case.prompt
        lines.append(f"prompt:   {prompt}")
    for check in case.failed_checks:
        answer = case.base_answer if check.on == "before" else case.answer
        when = "before training" if check.on == "before" else "after training"
        lines.append(f"check:    {check.name} {shown_argument(check.name, check.argument)} ({when})")
        if answer is not None:
            lines.append(f"answer:   {answer}")
        if check.on == "after" and case.raw_answer is not None and case.raw_answer != case.answer:
            lines.append(f"raw:      {case.raw_answer!r}")
        first = ""
        if check.expected is not None and answer is not None:
            diff = char_diff(check.expected, answer)
            lines.append(f"expected: {check.expected}")
            lines.append(f"diff:     {diff}   ([-expected-] {{+actual+}})")
            first = f"{check.name} ({when}): {diff}"
        if check.message:
            lines.append(f"reason:   {check.message}")
            first = first or f"{check.name} ({when}): {check.message}"
        message = message or first or f"{check.name} ({when}) failed"
    if case.base_answer is not None:
        lines.append(f"before training the model answered: {case.base_answer}")
    lines.append(f"at {case.location}")
    return message, "\n".join(lines)


def _add_case(suite: ET.Element, report: SpecReport, case: ExpectationReport, seconds: float,
              counts: dict[str, int]) -> None:
    element = ET.SubElement(suite, "testcase", classname=xml_text(classname(report.path)),
                            name=xml_text(case_name(report, case.nodeid)), time=_seconds(seconds))
    if case.location:
        element.set("file", xml_text(case.location.rsplit(":", 2)[0] if case.location.count(":") >= 2
                                     else case.location))
    counts["tests"] += 1
    if case.outcome == "failed":
        message, text = _failure_text(case)
        failure = ET.SubElement(element, "failure", message=xml_text(message), type="sft_spec.check")
        failure.text = xml_text(text)
        counts["failures"] += 1
    elif case.outcome == "skipped":
        ET.SubElement(element, "skipped", message=xml_text(report.skip_reason or "skipped"),
                      type="sft_spec.skip")
        counts["skipped"] += 1
    elif case.outcome == "xfailed":
        reason = case.xfail_reason or report.xfail_reason
        ET.SubElement(element, "skipped", type="sft_spec.xfail",
                      message=xml_text(f"expected failure: {reason}".rstrip(": ")))
        counts["skipped"] += 1
    if case.outcome in ("passed", "xpassed") and case.index < 0 and any(c.message for c in case.checks):
        # A training check or an eval set that passed: its measurement (pass_rate 0.93 >= 0.9, the final loss).
        ET.SubElement(element, "system-out").text = xml_text("\n".join(c.message for c in case.checks if c.message))


def _add_error(suite: ET.Element, report: SpecReport, counts: dict[str, int]) -> None:
    error = report.error
    name = case_name(report, report.nodeid) if report.nodeid != report.path else Path(report.path).name
    element = ET.SubElement(suite, "testcase", classname=xml_text(classname(report.path)),
                            name=xml_text(name), time=_seconds(report.duration), file=xml_text(report.path))
    message = (error.message if error else "") or report.outcome
    kind = f"sft_spec.{error.kind if error else report.outcome}"
    if error and error.phase:
        kind += f".{error.phase}"
    node = ET.SubElement(element, "error", message=xml_text(message.split("\n")[0]), type=xml_text(kind))
    details = [message]
    if error and error.location and not message.startswith(error.location):
        details.append(f"at {error.location}")
    if error and error.plugin:
        details.append(f"raised in plugin {error.plugin!r}")
    if error and error.traceback:
        details.append(error.traceback.rstrip())
    node.text = xml_text("\n".join(details))
    counts["tests"] += 1
    counts["errors"] += 1


def _suite(report: SpecReport, meta: dict[str, Any]) -> tuple[ET.Element, dict[str, int]]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    suite = ET.Element("testsuite", name=xml_text(report.nodeid))
    properties = [("model", report.model), ("method", report.method), ("variant", report.variant),
                  ("device", report.settings.get("device"))]
    properties += [(name, report.metrics.get(name)) for name in PROPERTY_METRICS]
    shown = [(k, v) for k, v in properties if v not in (None, "")]
    if shown:
        props = ET.SubElement(suite, "properties")
        for key, value in shown:
            ET.SubElement(props, "property", name=key, value=xml_text(value))
    if report.outcome in ("error", "interrupted") or not report.cases:
        if report.outcome in ("error", "interrupted"):
            _add_error(suite, report, counts)
        else:  # a skipped spec without selected expectations still shows up once
            case = ExpectationReport(nodeid=report.nodeid, index=-1, prompt=[], outcome=report.outcome)
            _add_case(suite, report, case, report.duration, counts)
    else:
        share = report.duration / len(report.cases)  # generation is batched: each case gets an equal share
        for case in report.cases:
            _add_case(suite, report, case, share, counts)
    if report.notes:
        ET.SubElement(suite, "system-out").text = xml_text("\n".join(report.notes))
    for key, value in counts.items():
        suite.set(key, str(value))
    suite.set("time", _seconds(report.duration))
    if meta.get("created"):
        suite.set("timestamp", str(meta["created"]))
    return suite, counts


def render_junitxml(reports: list[SpecReport], meta: dict[str, Any]) -> str:
    root = ET.Element("testsuites", name="sft-spec")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for report in reports:
        suite, counts = _suite(report, meta)
        root.append(suite)
        for key in totals:
            totals[key] += counts[key]
    for key, value in totals.items():
        root.set(key, str(value))
    duration = meta.get("summary", {}).get("duration")
    root.set("time", _seconds(duration if duration is not None else sum(r.duration for r in reports)))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


class JUnitXMLReporter(FileReporter):
    label = "JUnit XML report"

    def render(self, reports, meta) -> str:
        return render_junitxml(reports, meta)


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--junitxml", "--junit-xml", dest="junitxml_path", type=output_path, metavar="PATH",
                        default=None, help="write a JUnit XML report for CI servers")


@hookimpl
def sft_spec_configure(config):
    path = config.getoption("junitxml_path")
    if path and config.role == "main":
        config.pluginmanager.register(JUnitXMLReporter(config, path), "junitxml_reporter")
