"""The terminal reporter: pytest-style progress, failures with diffs, and a closing summary line.

Everything printed goes through :func:`sft_spec.escape.safe` before the reporter adds its own colours:
a spec name, an answer or an error cannot move the cursor, erase a CI log line or write one of its own.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from sft_spec import __version__, hookimpl
from sft_spec.reports import SpecReport

from ..common.escape import safe
from ..common.recorded import optional_version
from .failures import format_failure, shown_argument
from .report_files import case_outcome_counts, logged_every

LETTERS = {"passed": ".", "failed": "F", "error": "E", "skipped": "s", "xfailed": "x", "xpassed": "X",
           "interrupted": "!"}
COLORS = {"passed": "32", "failed": "31", "error": "31", "skipped": "33", "xfailed": "33", "xpassed": "33",
          "interrupted": "31", "deselected": "33"}
ORDER = ["failed", "passed", "skipped", "deselected", "xfailed", "xpassed", "error", "interrupted"]


class TerminalReporter:
    def __init__(self, config, file=None):
        self.config = config
        self.file = file or sys.stdout
        self.verbosity = config.getoption("verbose", 0) - config.getoption("quiet", 0)
        self.tb = config.getoption("tb", "auto")
        self.isatty = hasattr(self.file, "isatty") and self.file.isatty()
        self.color = wants_color(config.getoption("color", "auto"), self.isatty)
        self.width = shutil.get_terminal_size((100, 20)).columns if self.isatty else 100
        self.total = 0
        self.done = 0
        self.progress_shown = False
        self.start = time.time()
        self._first_step: dict[str, tuple[int, float]] = {}  # nodeid -> (step, time) of its first step
        self._deciles: dict[str, int] = {}  # nodeid -> last tenth of the steps printed (plain output)
        self._started = self._heartbeat = time.monotonic()

    # -- writing ---------------------------------------------------------------------------------

    def paint(self, text: str, outcome: str | None = None, bold: bool = False) -> str:
        if not self.color:
            return text
        code = COLORS.get(outcome or "", "")
        codes = ";".join(c for c in ("1" if bold else "", code) if c)
        return f"\x1b[{codes}m{text}\x1b[0m" if codes else text

    def write_line(self, text: str = "", outcome: str | None = None, bold: bool = False) -> None:
        """One line: control characters in ``text`` are escaped, then it is coloured."""
        self.write_parts((text, outcome), bold=bold)

    def write_parts(self, *parts: str | tuple[str, str | None], bold: bool = False) -> None:
        """One line from parts, each escaped and then coloured by its outcome: ``(text, "failed")``."""
        self._clear_progress()
        out = []
        for part in parts:
            text, outcome = (part, None) if isinstance(part, str) else part
            out.append(self.paint(safe(text), outcome, bold))
        print("".join(out), file=self.file, flush=True)

    def sep(self, char: str, title: str = "", outcome: str | None = None, bold: bool = False) -> None:
        width = min(self.width, 100)
        title = safe(title)
        if title:
            side = max(3, (width - len(title) - 2) // 2)
            line = f"{char * side} {title} {char * side}"
        else:
            line = char * width
        self.write_line(line, outcome, bold)

    def _clear_progress(self) -> None:
        if self.progress_shown:
            self.file.write("\r\x1b[K")
            self.progress_shown = False

    # -- hooks -----------------------------------------------------------------------------------

    @hookimpl
    def sft_spec_collection_finish(self, session):
        """``--collect-only`` and ``validate``: the ids (``-q``) or the items with their checks."""
        options = self.config.options
        if not options.collect_only:
            return
        for item in session.items:
            if options.quiet:
                for case in item.selected_cases:
                    self.write_line(case.nodeid)
                continue
            self.write_line(f"<Spec {item.nodeid}>" + (f"  tags: {', '.join(item.tags)}" if item.tags else ""))
            for note in item.notes:
                self.write_line(f"  {note}")
            for exp in item.selected_expectations:
                prompt = exp.prompt[0]["content"] if len(exp.prompt) == 1 else " | ".join(
                    f"{m['role']}: {m['content']}" for m in exp.prompt)
                checks = [f"{name} {arg!r}" for name, arg in exp.checks]
                checks += ["before: " + ", ".join(f"{n} {a!r}" for n, a in exp.before)] if exp.before else []
                self.write_line(f"  <Expectation {exp.nodeid.rsplit('::', 1)[1]}> {prompt!r}: {'; '.join(checks)}")
            for check in item.selected_training_checks:
                shown = getattr(check.argument, "shown", check.argument)  # an eval set: its name and size
                self.write_line(f"  <Check {check.nodeid.rsplit('::', 1)[1]}> {shown_argument(check.name, shown)}")
        errors = session.collect_errors
        for report in errors:
            for i, line in enumerate((report.error.message if report.error else "").split("\n") or [""]):
                self.write_line(("ERROR " if i == 0 else "      ") + line)
        specs, checks = len(session.items), sum(len(i.selected_cases) for i in session.items)
        summary = f"{specs} spec{'' if specs == 1 else 's'}, {checks} check{'' if checks == 1 else 's'}"
        if session.deselected:
            summary += f" ({session.deselected} deselected)"
        if errors:
            summary += ", " + _errors_in(errors)
        verb = "valid" if options.command == "validate" and not errors else "collected"
        self.write_line(f"{summary} {verb}")

    @hookimpl
    def sft_spec_session_start(self, session):
        self.start = session.start_time
        self.total = len(session.items) + len(session.collect_errors)
        if self.verbosity < 0:
            return
        self.sep("=", "sft-spec session starts", bold=True)
        versions = ", ".join(f"{d} {optional_version(d)}" for d in ("torch", "transformers", "trl", "peft"))
        bitsandbytes = optional_version("bitsandbytes")
        if bitsandbytes != "missing":  # optional, but it decides what adamw_8bit and qlora do
            versions += f", bitsandbytes {bitsandbytes}"
        self.write_line(f"python {sys.version.split()[0]}, sft-spec {__version__}, {versions}")
        self.write_line(f"rootdir: {self.config.rootdir}")
        for shadowed in self.config.registry.shadowed:  # a plugin's name that another plugin's took over
            self.write_line(f"note: {shadowed}")
        checks = sum(len(i.selected_cases) for i in session.items)
        line = (f"collected {len(session.items)} spec{'s' if len(session.items) != 1 else ''} "
                f"({checks} check{'s' if checks != 1 else ''})")
        if session.collect_errors:
            line += " / " + _errors_in(session.collect_errors)
        if session.deselected:
            line += f" / {session.deselected} deselected"
        self.write_line(line, bold=True)
        self.write_line()

    @hookimpl
    def sft_spec_run_progress(self, item, phase, step, total, loss):
        """A tty gets one line, rewritten in place. Elsewhere (CI logs) ``-v`` prints a plain line every
        10% of the training steps; without ``-v`` a heartbeat line at most once a minute, so a long training
        is not silent and a short one prints nothing more."""
        if self.verbosity < 0:
            return
        eta = self._eta(item.nodeid, phase, step, total)
        if self.isatty:
            text = f"{item.nodeid} {phase}"
            if total:
                text += f" {step}/{total}"
            if loss is not None:
                text += f" loss {loss:.4g}"
            if eta is not None:
                text += f" eta {_seconds(eta)}"
            self.file.write("\r\x1b[K" + safe(text)[: self.width - 1])
            self.file.flush()
            self.progress_shown = True
            return
        if self.verbosity == 0:  # a CI log without -v: a heartbeat now and then, so a long run is not silent
            now = time.monotonic()
            if now - self._heartbeat < HEARTBEAT_SECONDS:
                return
            self._heartbeat = now
            text = f"  {item.nodeid} {phase}" + (f" {step}/{total}" if total else "")
            text += (f" loss {loss:.4g}" if loss is not None else "") + (f" eta {_seconds(eta)}" if eta else "")
            self.write_line(text + f" (running for {_seconds(now - self._started)})")
            return
        if self.verbosity < 1 or phase != "train" or not total or step <= 0:
            return
        decile = min(10, step * 10 // total)
        if decile <= self._deciles.get(item.nodeid, 0) and step != total:
            return
        self._deciles[item.nodeid] = decile
        text = f"  {item.nodeid} step {step}/{total}"
        if loss is not None:
            text += f" loss {loss:.4g}"
        if eta is not None:
            text += f" eta {_seconds(eta)}"
        self.write_line(text)

    def _eta(self, nodeid: str, phase: str, step: int, total: int) -> float | None:
        """Seconds left, from the time per step since the first step this spec reported."""
        if phase != "train" or not total:
            return None
        now = time.perf_counter()
        first = self._first_step.setdefault(nodeid, (step, now))
        if step <= first[0]:
            return None
        return (now - first[1]) / (step - first[0]) * max(0, total - step)

    @hookimpl
    def sft_spec_log_report(self, report: SpecReport, session):
        self.done += 1
        if self.verbosity < 0:
            return
        percent = f"[{100 * self.done // max(self.total, 1):3d}%]"
        cases = report.cases if report.outcome not in ("error", "interrupted") else []
        letters = "".join(LETTERS.get(c.outcome, "?") for c in cases) or LETTERS.get(report.outcome, "?")
        timing = f" ({report.duration:.1f}s)" if report.duration else ""
        if report.cached:  # reused from the result cache: nothing was trained
            timing = " (cached)"
        if self.verbosity > 0:
            for case in cases:
                reason = case.xfail_reason or report.xfail_reason
                shown = f" ({reason})" if reason and case.outcome in ("xfailed", "xpassed") else ""
                self.write_line(f"{case.nodeid} {case.outcome.upper()}{shown}", case.outcome)
            if not cases:
                self.write_line(f"{report.nodeid} {report.outcome.upper()}", report.outcome)
        else:
            self.write_parts(f"{report.nodeid} ", (letters, report.outcome), f"{timing} {percent}")
        losses = report.losses
        if losses and self.verbosity > 0:
            every = logged_every(report)
            steps = report.metrics.get("steps", len(losses) * every)
            logged = f" ({len(losses)} logged, every {every})" if every > 1 else ""
            self.write_line(f"    loss {losses[0]:.4g} -> {losses[-1]:.4g} over {steps} steps{logged}"
                            + (f", {report.metrics['train_seconds']:.1f}s training"
                               if "train_seconds" in report.metrics else ""))
        for note in report.notes:
            self.write_line(f"    {note}")
        if report.outcome == "skipped" and self.verbosity > 0:
            self.write_line(f"    skipped: {report.skip_reason}", "skipped")

    @hookimpl(trylast=True)
    def sft_spec_session_finish(self, session, exitstatus):
        reports = session.reports
        errors = [r for r in reports if r.outcome in ("error", "interrupted")]
        failures = [(r, c) for r in reports for c in r.cases if c.outcome == "failed"]
        if errors:
            self.sep("=", "ERRORS", "error", bold=True)
            for report in errors:
                self._show_error(report)
        if failures:
            self.sep("=", "FAILURES", "failed", bold=True)
            for report, case in failures:
                self._show_failure(report, case)
        durations = self.config.getoption("durations")
        if durations is not None:
            self._durations(reports, durations)
        extra: list[str] = []
        self.config.hook.sft_spec_terminal_summary(session=session, write_line=extra.append)
        for line in extra:
            self.write_line(line)
        self._short_summary(reports)
        if session.shouldstop:
            self.sep("!", session.shouldstop, "failed")
        if session.interrupted:
            self.sep("!", "KeyboardInterrupt", "failed")
        counts = case_outcome_counts(reports)
        if session.deselected:
            counts["deselected"] = session.deselected
        parts = [f"{counts[k]} {k if k != 'error' or counts[k] == 1 else 'errors'}" for k in ORDER if counts.get(k)]
        summary = ", ".join(parts) or "no tests ran"
        main = "failed" if exitstatus else "passed"
        self.sep("=", f"{summary} in {time.time() - self.start:.2f}s", main, bold=True)

    def _durations(self, reports: list[SpecReport], count: int) -> None:
        """pytest's --durations for phases: where a run's seconds went (a result reused from the cache took
        none: its recorded phases are the original run's)."""
        timed = sorted(((seconds, phase, report.nodeid) for report in reports if not report.cached
                        for phase, seconds in report.phases.items()), reverse=True)
        shown = [t for t in timed if t[0] >= 0.005 or self.verbosity > 1]
        shown = shown[:count] if count > 0 else shown
        self.sep("=", f"slowest {count} durations" if count > 0 else "slowest durations")
        for seconds, phase, nodeid in shown:
            self.write_line(f"{seconds:.2f}s {phase:<16} {nodeid}")
        hidden = len(timed) - len([t for t in timed if t[0] >= 0.005 or self.verbosity > 1])
        if hidden:
            self.write_line(f"({hidden} durations < 0.005s hidden.  Use -vv to show these durations.)")
        cached = sum(r.cached for r in reports)
        if cached:
            self.write_line(f"({cached} spec{'s' if cached != 1 else ''} reused from the result cache: no time spent)")

    # -- details ---------------------------------------------------------------------------------

    def _show_error(self, report: SpecReport) -> None:
        error = report.error
        where = f"at {error.phase} of " if error and error.phase else ""
        self.sep("_", f"ERROR {where}{report.nodeid}", "error")
        if error is None:
            return
        for line in error.message.split("\n"):
            located = line.startswith(error.location or "\0") or error.phase in ("collect", "plugin")
            prefix = "" if located else f"{error.location}: "
            self.write_line(f"{prefix}{line}", "error")
        if error.plugin:
            self.write_line(f"(raised in plugin {error.plugin!r}, phase {error.phase})")
        if error.traceback and self.tb == "long":
            for line in error.traceback.rstrip().split("\n"):
                self.write_line(line)
        elif error.traceback and self.tb != "no":
            self.write_line("(use --tb=long for the traceback)")

    def _show_failure(self, report: SpecReport, case) -> None:
        self.sep("_", case.nodeid, "failed")
        for text, style in format_failure(case, report.losses):
            self.write_line(text, style)

    def _short_summary(self, reports: list[SpecReport]) -> None:
        lines = []
        for report in reports:
            if report.outcome in ("error", "interrupted"):
                message = (report.error.message.split("\n")[0] if report.error else "")
                lines.append(("ERROR" if report.outcome == "error" else "INTERRUPTED", report.nodeid, message))
            for case in report.cases:
                if case.outcome == "failed":
                    first = next((c for c in case.checks if not c.passed), None)
                    message = f"{first.name}: {first.message}" if first else ""
                    lines.append(("FAILED", case.nodeid, message))  # a strict XPASS is a failed case
        if not lines:
            return
        self.sep("=", "short test summary info")
        for word, nodeid, message in lines:
            self.write_line(f"{word} {nodeid} - {message}" if message else f"{word} {nodeid}",
                            "failed" if word != "XPASS" else "xpassed")


def print_results(reports: list[SpecReport], meta: dict, verbose: int = 0) -> None:
    """A results file shown as the terminal showed its run: a line per spec, the failures with their diffs,
    the short summary and the closing line (``sft-spec report RESULTS.json`` with no file to write)."""
    import shlex
    from types import SimpleNamespace

    options = {"verbose": verbose, "quiet": 0, "tb": "auto", "color": "auto"}
    # What a run's reporter reads from its config; plugins' terminal summaries belong to a live run.
    config = SimpleNamespace(getoption=lambda name, default=None: options.get(name, default),
                             hook=SimpleNamespace(sft_spec_terminal_summary=lambda session, write_line: None))
    summary = meta.get("summary") or {}
    session = SimpleNamespace(reports=reports, deselected=summary.get("deselected", 0), shouldstop=False,
                              interrupted=bool(meta.get("interrupted")))
    reporter = TerminalReporter(config)
    reporter.total = len(reports)
    reporter.write_line(f"results of: {shlex.join(str(a) for a in meta.get('command') or [])} "
                        f"({meta.get('created', 'no date')})")
    for report in reports:
        reporter.sft_spec_log_report(report, session)
    duration = summary.get("duration", sum(r.duration for r in reports))
    reporter.start = time.time() - (duration if isinstance(duration, int | float) else 0)
    reporter.sft_spec_session_finish(session, meta.get("exitstatus", 0))


def wants_color(option: str, isatty: bool) -> bool:
    """pytest's rule: ``--color=yes|no`` decides; with ``auto``, ``PY_COLORS=1|0``, then ``NO_COLOR``, then
    ``FORCE_COLOR`` (a CI log that renders colours), then whether the output is a terminal."""
    if option in ("yes", "no"):
        return option == "yes"
    if os.environ.get("PY_COLORS") in ("0", "1"):
        return os.environ["PY_COLORS"] == "1"
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return isatty and os.environ.get("TERM") != "dumb"


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--color", choices=("yes", "no", "auto"), default="auto",
                        help="colour the terminal output: yes, no, or auto (a terminal, unless NO_COLOR is set; "
                        "FORCE_COLOR or PY_COLORS=1 force it), as pytest's --color")
    parser.add_argument("--durations", type=int, default=None, metavar="N",
                        help="show the N slowest phases of the run's specs (library imports, model load, "
                        "training, ...), N=0 for all, as pytest's --durations")


def _errors_in(reports: list[SpecReport]) -> str:
    """``3 errors in 1 file``: the located errors listed, and the broken files (or plugins), which the final
    line counts one by one, as pytest counts a collection error per file."""
    count = sum(r.error.count if r.error else 1 for r in reports)
    text = f"{count} error{'s' if count != 1 else ''}"
    if count != len(reports):
        text += f" in {len(reports)} file{'s' if len(reports) != 1 else ''}"
    return text


#: Without -v and without a terminal, a progress line at most this often (seconds).
HEARTBEAT_SECONDS = 60.0


def _seconds(value: float) -> str:
    value = int(round(value))
    return f"{value}s" if value < 60 else f"{value // 60}m{value % 60:02d}s"


@hookimpl(trylast=True)
def sft_spec_configure(config):
    # Registered after every other plugin's reporters: its trylast session_finish then runs after theirs
    # (the file reporters are trylast too), so the summary can name the files they wrote.
    if config.role == "main":
        config.pluginmanager.register(TerminalReporter(config), "terminalreporter")
