"""A plugin that raises in a session-level hook is an internal error, as pytest's INTERNALERROR: exit code 3,
the JSON report's exit status 3, and the other specs' reports still written."""

from __future__ import annotations

import json

import pytest

SPEC = """\
model: builtin:tiny-gemma
skip: not needed for this test
data:
  conversations:
    - - {role: user, content: a}
      - {role: assistant, content: b}
expect:
  - {prompt: a, equals: b}
"""

CRASHING = """\
from sft_spec import hookimpl


@hookimpl
def {hook}({args}):
    raise ValueError("the plugin's bug")
"""


@pytest.mark.parametrize("hook,args", [
    ("sft_spec_log_report", "report"),
    ("sft_spec_collection_modifyitems", "items"),
    ("sft_spec_session_finish", "session"),
    ("sft_spec_session_start", "session"),
])
def test_a_crashing_session_hook_is_an_internal_error_and_the_json_agrees(tmp_path, monkeypatch, capsys, hook, args):
    from sft_spec.cli import main

    (tmp_path / "crashing.py").write_text(CRASHING.format(hook=hook, args=args), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("a", "b"):
        (tmp_path / f"{name}.sft.yaml").write_text(SPEC, encoding="utf-8")
    code = main(["run", str(tmp_path), "-p", "crashing", "--json", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    document = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert code == 3 and document["exitstatus"] == 3, captured.out
    assert "INTERNALERROR> " in captured.err and "ValueError: the plugin's bug" in captured.err
    if hook == "sft_spec_log_report":  # one plugin's bug does not lose the others' reports
        assert len(document["specs"]) == 2


def test_a_crash_in_configure_is_an_internal_error(tmp_path, monkeypatch, capsys):
    from sft_spec.cli import main

    (tmp_path / "crashing.py").write_text(CRASHING.format(hook="sft_spec_configure", args="config"),
                                          encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "a.sft.yaml").write_text(SPEC, encoding="utf-8")
    assert main(["run", str(tmp_path), "-p", "crashing"]) == 3
    assert "INTERNALERROR> " in capsys.readouterr().err


WRAPPING = """\
from sft_spec import hookimpl

SEEN = []


@hookimpl(wrapper=True)
def {hook}({args}):
    SEEN.append("before")
    result = yield
    SEEN.append("after")
    return result
"""


@pytest.mark.parametrize("hook,args", [
    ("sft_spec_log_report", "report"),
    ("sft_spec_persist_report", "report"),
    ("sft_spec_session_finish", "session"),
])
def test_a_wrapper_on_a_report_or_session_hook_runs_around_it(tmp_path, monkeypatch, hook, args):
    # pluggy makes these calls (with each plain implementation guarded), so a wrapper is honoured as on any
    # other hook: a loop of our own over get_hookimpls() used to skip it without a word.
    import importlib

    from sft_spec.cli import main

    module = f"wrapping_{hook}"  # one module per case: an imported one stays in sys.modules
    (tmp_path / f"{module}.py").write_text(WRAPPING.format(hook=hook, args=args), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "a.sft.yaml").write_text(SPEC, encoding="utf-8")
    assert main(["run", str(tmp_path), "-p", module]) == 0
    seen = importlib.import_module(module).SEEN
    assert seen == ["before", "after"], seen


def test_later_implementations_still_run_and_see_the_internal_error(tmp_path, monkeypatch, capsys):
    from sft_spec.cli import main

    (tmp_path / "crashing.py").write_text(CRASHING.format(hook="sft_spec_session_finish", args="session"),
                                          encoding="utf-8")
    (tmp_path / "seeing.py").write_text(
        "from sft_spec import hookimpl\nSEEN = []\n\n\n@hookimpl(trylast=True)\n"
        "def sft_spec_session_finish(session, exitstatus):\n    SEEN.append(exitstatus)\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "a.sft.yaml").write_text(SPEC, encoding="utf-8")
    assert main(["run", str(tmp_path), "-p", "crashing", "-p", "seeing"]) == 3
    import seeing

    assert seeing.SEEN == [3]


RAISING_WRAPPER = """\
from sft_spec import hookimpl


@hookimpl(wrapper=True)
def {hook}({args}):
    if "{when}" == "before":
        raise ValueError("the wrapper's bug")
    result = yield
    raise ValueError("the wrapper's bug")
"""


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("hook,args", [("sft_spec_log_report", "report"), ("sft_spec_session_finish", "session")])
def test_a_wrapper_that_raises_loses_no_report(tmp_path, monkeypatch, capsys, hook, args, when):
    # A wrapper is called by pluggy now; one that raised took every later report and the summary with it,
    # and the run exited 1 (read as "tests failed") instead of 3.
    from sft_spec.cli import main

    module = f"raising_{hook}_{when}"
    (tmp_path / f"{module}.py").write_text(RAISING_WRAPPER.format(hook=hook, args=args, when=when),
                                           encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("a", "b"):
        (tmp_path / f"{name}.sft.yaml").write_text(SPEC, encoding="utf-8")
    code = main(["run", str(tmp_path), "-p", module, "--junitxml", str(tmp_path / "j.xml")])
    captured = capsys.readouterr()
    assert code == 3, captured.out + captured.err
    assert "INTERNALERROR> " in captured.err and "ValueError: the wrapper's bug" in captured.err
    assert (tmp_path / "j.xml").read_text(encoding="utf-8").count("<testcase") == 2
    assert "2 skipped" in captured.out.splitlines()[-1]



KEEPING = """\
from sft_spec import hookimpl

KEPT, LOGGED = [], []


@hookimpl(tryfirst=True)
def sft_spec_persist_report(report, session):
    KEPT.append(report)  # e.g. an uploader that holds on to what it was given


@hookimpl(trylast=True, specname="sft_spec_persist_report")
def the_disk_is_full(report, session):
    raise OSError("No space left on device")


@hookimpl
def sft_spec_log_report(report, session):
    LOGGED.append(report)
"""


def test_a_failed_persist_errors_the_spec_without_editing_the_report_it_was_given(tmp_path, monkeypatch):
    # Reports are made once: persisting is the last step of making the one that is logged. Before, log_report
    # rewrote the outcome of the very object the persist hooks had been given ("skipped" turned "error" there).
    import importlib

    from sft_spec.cli import main

    (tmp_path / "keeping_reports.py").write_text(KEEPING, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "a.sft.yaml").write_text(SPEC, encoding="utf-8")
    assert main(["run", str(tmp_path), "-p", "keeping_reports"]) == 1
    plugin = importlib.import_module("keeping_reports")
    (kept,), (logged,) = plugin.KEPT, plugin.LOGGED
    assert kept.outcome == "skipped" and kept.error is None
    assert logged.outcome == "error" and logged.error.phase == "persist"
    assert "No space left on device" in logged.error.message and logged.nodeid == kept.nodeid


def test_a_failed_persist_leaves_an_interrupted_or_errored_spec_as_it_ended():
    # An interrupt turned into "error" by a failed save lost the interrupt (the run went on).
    from sft_spec.reports import ErrorInfo, SpecReport
    from sft_spec.session import persist_failed

    for outcome, error in (("interrupted", None), ("error", ErrorInfo("the loader exploded"))):
        report = SpecReport(nodeid="a.sft.yaml::a", path="a.sft.yaml", name="a", variant=None, outcome=outcome,
                            error=error)
        logged = persist_failed(report, ["OSError: No space left on device"])
        assert (logged.outcome, logged.error) == (outcome, error)
        assert "could not save the files this spec records: OSError: No space left on device" in logged.notes
    passed = SpecReport(nodeid="a.sft.yaml::a", path="a.sft.yaml", name="a", variant=None, outcome="passed")
    assert persist_failed(passed, ["OSError: x"]).outcome == "error"
