"""What the file reporters share: render once at the end of the session, write atomically, and name
the file (or why it could not be written) in the terminal summary."""

from __future__ import annotations

from pathlib import Path

from sft_spec import hookimpl
from sft_spec.fileio import atomic_write_text


class FileReporter:
    label = "report"

    def __init__(self, config, path: Path):
        self.config = config
        self.path = Path(path)
        self.written = False
        self.problem = ""

    def render(self, reports, meta) -> str:
        raise NotImplementedError

    @hookimpl
    def sft_spec_session_finish(self, session, exitstatus):
        from sft_spec_plugins.json_report import session_meta

        try:
            meta = session_meta(session, True, exitstatus)
            atomic_write_text(self.path, self.render(session.reports, meta))
            self.written = True
        except OSError as exc:  # an unwritable report path must not hide the run's results
            self.problem = f"{type(exc).__name__}: {exc}"

    @hookimpl
    def sft_spec_terminal_summary(self, session, write_line):
        if self.problem:
            write_line(f"{self.label}: could not write {self.path}: {self.problem}")
        elif self.written:
            write_line(f"{self.label}: {self.path}")
