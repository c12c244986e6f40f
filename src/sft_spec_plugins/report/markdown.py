"""CI summaries in Markdown: ``--md FILE`` (outcome counts, a table of specs, the failures with their
diffs, and with ``--base BASE.json`` the comparison with that run), ``--github-summary`` to write it to
``$GITHUB_STEP_SUMMARY`` on GitHub Actions; ``sft-spec compare --md`` writes a comparison alone.

Everything from specs, data and models is escaped for Markdown (GitHub renders HTML in it): control
characters as ``\\x1b``, HTML's ``<>&``, and the characters that would turn text into markup.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.reports import SpecReport

from ..common.escape import md_code, md_text
from ..common.files import output_path
from .compare import comparison_markdown
from .failures import format_failure
from .report_files import FileReporter, case_outcome_counts


def run_markdown(reports: list[SpecReport], meta: dict[str, Any], comparison=None) -> str:
    counts = case_outcome_counts(reports)
    failed = [r for r in reports if r.outcome in ("failed", "error", "interrupted")]
    lines = [f"## sft-spec: {'failed' if failed else 'passed'}", "",
             ", ".join(f"{n} {k}" for k, n in counts.items()) or "no tests ran", ""]
    packages = (meta.get("environment") or {}).get("packages") or {}
    if packages:
        lines += [md_text(", ".join(f"{k} {v}" for k, v in packages.items() if v)), ""]
    lines += ["| spec | outcome | checks | final loss |", "| --- | --- | --- | --- |"]
    for r in reports:
        final = r.metrics.get("final_loss")
        passed = sum(c.outcome in ("passed", "xfailed") for c in r.cases)
        lines.append(f"| {md_text(r.nodeid)} | {md_text(r.outcome)} | {passed}/{len(r.cases)} | "
                     f"{f'{final:.4g}' if isinstance(final, int | float) else ''} |")
    for r in failed:
        lines += ["", f"### {md_text(r.nodeid)}: {md_text(r.outcome)}"]
        if r.error is not None:
            lines.append(md_code(f"{r.error.location}: {r.error.message}"))
        for case in r.cases:
            if case.outcome == "failed":
                lines.append(md_code("\n".join(text for text, _ in format_failure(case, r.losses))))
    if comparison is not None:
        lines += ["", comparison_markdown(comparison, heading="###")]
    return "\n".join(lines) + "\n"


class MarkdownReporter(FileReporter):
    label = "Markdown summary"

    def __init__(self, config, path: Path, base: Path | None):
        super().__init__(config, path)
        self.base = base

    def render(self, reports, meta) -> str:
        comparison = None
        if self.base is not None:
            from .compare import compare_reports
            from .json_report import load_document

            base_meta, base = load_document(self.base)
            try:
                comparison = compare_reports(base_meta, base, meta, reports)
            except Exception as exc:  # noqa: BLE001 - the run's own summary is still written
                text = run_markdown(reports, meta, None)
                return text + f"\nThe comparison with {md_text(str(self.base))} could not be made: " \
                              f"{md_text(type(exc).__name__)}: {md_text(str(exc)[:300])}\n"
        return run_markdown(reports, meta, comparison)


class GitHubSummary(MarkdownReporter):
    """Appends (GitHub's step summary is one file per step, shared by its commands)."""

    label = "GitHub step summary"

    @hookimpl(trylast=True)
    def sft_spec_session_finish(self, session, exitstatus):
        from .report_files import session_meta

        text = self.render(session.reports, session_meta(session, True, exitstatus))
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
            self.written = True
        except OSError as exc:
            self.problem = f"{type(exc).__name__}: {exc}"


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--md", dest="md_path", type=output_path, metavar="PATH", default=None,
                        help="write a Markdown summary (counts, failures with diffs; with --base, the comparison)")
    parser.add_argument("--github-summary", action="store_true",
                        help="append the Markdown summary to $GITHUB_STEP_SUMMARY (GitHub Actions)")
    parser.add_argument("--base", dest="base_results", type=Path, metavar="BASE.json", default=None,
                        help="a results file to compare this run with in the Markdown summary")


@hookimpl
def sft_spec_configure(config):
    if config.role != "main":
        return
    base = config.getoption("base_results")
    if base is not None:  # read now: a wrong file is a usage error before anything trains
        from .json_report import load_document

        load_document(Path(base))
    path = config.getoption("md_path")
    if path:
        config.pluginmanager.register(MarkdownReporter(config, path, base), "markdown_reporter")
    if config.getoption("github_summary"):
        target = os.environ.get("GITHUB_STEP_SUMMARY")
        if not target:
            from sft_spec.errors import UsageError

            raise UsageError("--github-summary: $GITHUB_STEP_SUMMARY is not set (it is on GitHub Actions); "
                             "use --md PATH elsewhere")
        config.pluginmanager.register(GitHubSummary(config, Path(target), base), "github_summary")
