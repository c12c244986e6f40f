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

    def attempt(self, write) -> None:
        """Run ``write()``; an unwritable report path is noted for the summary, never fatal to the run."""
        try:
            write()
            self.written = True
            self.problem = ""
        except OSError as exc:
            self.problem = f"{type(exc).__name__}: {exc}"

    @hookimpl
    def sft_spec_session_finish(self, session, exitstatus):
        from sft_spec_plugins.json_report import session_meta

        self.attempt(lambda: atomic_write_text(
            self.path, self.render(session.reports, session_meta(session, True, exitstatus))))

    @hookimpl
    def sft_spec_terminal_summary(self, session, write_line):
        if self.problem:
            write_line(f"{self.label}: could not write {self.path}: {self.problem}")
        elif self.written:
            write_line(f"{self.label}: {self.path}")
