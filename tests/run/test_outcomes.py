"""skip, xfail, xpass, -x and sft-defaults.yaml, as the spec format promises."""

from __future__ import annotations

import pytest
from conftest import XFAIL_CHECKS


def test_xfail_skip_and_strict_xpass(sft, write_spec, one_answer_spec):
    weak = one_answer_spec(epochs=1, lr=1e-6)
    folder = write_spec("a_xfail.sft.yaml", 'xfail: "one epoch is not enough"\n' + weak).parent
    write_spec("b_skip.sft.yaml", 'skip: "not today"\n' + weak)
    write_spec("c_xpass.sft.yaml", 'xfail: "we thought it would fail"\n' + one_answer_spec())
    result = sft("run", folder, "-v")
    outcomes = {r.name: r.outcome for r in result.recorder.reports}
    assert outcomes == {"a_xfail": "xfailed", "b_skip": "skipped", "c_xpass": "xpassed"}
    assert result.code == 0, result.out
    assert "1 skipped, 1 xfailed, 1 xpassed" in result.out.splitlines()[-1]
    assert "skipped: not today" in result.out

    strict = write_spec("strict.sft.yaml", 'xfail: {reason: "should fail", strict: true}\n' + one_answer_spec(),
                        folder=folder / "strict")
    result = sft("run", strict)
    # As pytest: a strict xfail that passes is a failure of each case, reported XPASS(strict).
    assert result.recorder.reports[0].outcome == "failed"
    assert [c.outcome for c in result.recorder.reports[0].cases] == ["failed"]
    assert result.code == 1
    assert "[XPASS(strict)] should fail: the checks passed" in result.out


def test_exitfirst_stops_after_the_first_failure(sft, write_spec, one_answer_spec):
    weak = one_answer_spec(epochs=1, lr=1e-6)
    folder = write_spec("a.sft.yaml", weak).parent
    write_spec("b.sft.yaml", weak)
    result = sft("run", "-x", folder)
    assert [r.name for r in result.recorder.reports] == ["a"]
    assert "stopping after 1 failure" in result.out
    assert result.code == 1


def test_defaults_files_merge_under_specs_nearer_ones_win(sft, write_spec, tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n", encoding="utf-8")  # the project's root
    write_spec("sft-defaults.yaml", """\
        model: builtin:tiny-gemma
        method: lora
        lora: {r: 16, lora_alpha: 32}
        training: {num_train_epochs: 30, learning_rate: 1.0e-6}
        tags: [from-root]
    """, folder=tmp_path)
    write_spec("sft-defaults.yaml", "training: {learning_rate: 1.0e-2}\n", folder=tmp_path / "team")
    write_spec("learn.sft.yaml", """\
        data:
          conversations:
            - - {role: user, content: 微调测试}
              - {role: assistant, content: 我学会了}
        expect:
          - {prompt: 微调测试, equals: 我学会了}
    """, folder=tmp_path / "team")
    result = sft("run", tmp_path)
    report = result.recorder.reports[0]
    assert report.settings["training"]["learning_rate"] == 1e-2  # the nearer file won
    assert report.settings["training"]["num_train_epochs"] == 30  # merged from the root file
    assert report.tags == ["from-root"]
    assert result.code == 0, result.out




def test_an_expectation_can_be_expected_to_fail_while_the_others_must_pass(sft, write_spec, tmp_path):
    path = write_spec("probe.sft.yaml", XFAIL_CHECKS)
    result = sft("run", path, "-v", "--no-cache", "--junitxml", tmp_path / "j.xml")
    report = result.recorder.reports[0]
    assert [c.outcome for c in report.expectations] == ["passed", "xfailed", "xpassed"], result.out
    assert report.outcome == "passed" and result.code == 0
    assert "probe.sft.yaml::probe::expect[1] XFAILED (a probe we know fails)" in result.out
    assert "1 passed, 1 xfailed, 1 xpassed" in result.out.splitlines()[-1]
    assert 'message="expected failure: a probe we know fails"' in (tmp_path / "j.xml").read_text(encoding="utf-8")

    # An expectation-level xfail does not hide the others: when the answer is no longer learnt, the run fails.
    weak = write_spec("weak.sft.yaml", XFAIL_CHECKS.replace("num_train_epochs: 30", "num_train_epochs: 1"))
    result = sft("run", weak, "--no-cache")
    assert [c.outcome for c in result.recorder.reports[0].expectations][0] == "failed"
    assert result.code == 1


def test_a_strict_expectation_xfail_that_passes_fails_the_run(sft, write_spec):
    text = XFAIL_CHECKS.replace("xfail: true", "xfail: {reason: learnt too well, strict: true}")
    result = sft("run", write_spec("strict.sft.yaml", text), "--no-cache")
    case = result.recorder.reports[0].expectations[2]
    assert case.outcome == "failed" and result.code == 1
    assert "[XPASS(strict)] learnt too well: the checks passed" in result.out


def test_a_bad_expectation_xfail_is_a_located_error(sft, write_spec):
    text = XFAIL_CHECKS.replace('xfail: "a probe we know fails"', "xfail: [1, 2]")
    result = sft("validate", write_spec("bad.sft.yaml", text))
    assert result.code == 1, result.out
    assert "bad.sft.yaml:14:5: expect[1].xfail: expected a reason (string), true, or a mapping with reason and " \
           "strict" in result.out


def test_a_skipped_spec_counts_every_case_as_pytest_does(sft, write_spec, one_answer_spec, tmp_path):
    """Before, a skipped spec reported its expectations skipped and dropped its training checks, so the CLI,
    JSON and JUnit counted fewer cases than `pytest specs/`."""
    import json
    import xml.etree.ElementTree as ET

    text = 'skip: "not today"\n' + one_answer_spec() + "checks: {loss_decreased: true}\n"
    result = sft("run", write_spec("later.sft.yaml", text), "--json", tmp_path / "r.json",
                 "--junitxml", tmp_path / "j.xml")
    assert result.code == 0
    assert "2 skipped" in result.out.splitlines()[-1]
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["outcomes"] == {"skipped": 2}
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert (suite.get("tests"), suite.get("skipped")) == ("2", "2")


def test_a_failure_says_its_strongest_why(sft, write_spec, one_answer_spec):
    result = sft("run", write_spec("slow.sft.yaml", one_answer_spec(method="full", epochs=3, lr=1e-9)), "--no-cache")
    assert result.code == 1
    line = next(line for line in result.out.splitlines() if line.startswith("why:"))
    assert "the loss barely moved" in line and "over 3 logged steps" in line, result.out


def test_an_answer_the_training_left_as_it_was_is_named():
    from sft_spec.reports import CheckReport, ExpectationReport
    from sft_spec_plugins.report.failures import why

    case = ExpectationReport(nodeid="s::expect[0]", index=0, prompt=[{"role": "user", "content": "q"}],
                             location="s.sft.yaml:8:5", outcome="failed", answer="a", base_answer="a",
                             checks=[CheckReport("equals", "b", False, "differs", on="after")])
    assert why(case, [7.7, 1.2]) == ("why:      the answer is identical to the base model's: training did not "
                                     "change it")
    assert why(case, []) is not None and why(case, [7.7, 7.5]).startswith("why:      the loss barely moved")
    case.base_answer = "c"
    assert why(case, [7.7, 1.2]) is None


def test_a_cases_own_non_strict_xfail_wins_over_its_specs_strict_one(sft, write_spec, tmp_path):
    # As pytest's closest mark: expect[2]'s own non-strict xfail decides it (XPASS, not a failure) inside a
    # spec whose xfail is strict. It used to read [XPASS(strict)] in JUnit, the terminal's summary and --lf.
    text = XFAIL_CHECKS.replace("    expect:\n", '    xfail: {reason: "known broken", strict: true}\n    expect:\n')
    text = text.replace("# learnt: a real pass\n        equals: 我学会了",
                        "# xfailed by the spec's mark\n        equals: 我没学会吗")
    path = write_spec("mixed.sft.yaml", text)
    result = sft("run", path, "-v", "--no-cache", "--junitxml", tmp_path / "j.xml")
    report = result.recorder.reports[0]
    assert [c.outcome for c in report.expectations] == ["xfailed", "xfailed", "xpassed"], result.out
    assert report.outcome == "xfailed" and result.code == 0, result.out
    assert "XPASS(strict)" not in result.out
    junit = (tmp_path / "j.xml").read_text(encoding="utf-8")
    assert "XPASS(strict)" not in junit and 'failures="0"' in junit, junit
    from sft_spec_plugins.collect.lastfailed import lastfailed_path, read_lastfailed

    failed = read_lastfailed(lastfailed_path(result.recorder.session.config.cache_dir))
    assert not [nodeid for nodeid in failed if "mixed" in nodeid], failed  # --lf reruns none of it


def test_apply_xfail_decides_a_cases_outcome_from_its_mark():
    from sft_spec.reports import XPASS_STRICT, ExpectationReport
    from sft_spec.spec import XfailSpec as XFail
    from sft_spec_plugins.run.protocol import apply_xfail

    def case(outcome):
        return ExpectationReport(nodeid="x", index=0, prompt=[], location="x", outcome=outcome)

    assert apply_xfail(case("passed"), None).outcome == "passed"
    assert apply_xfail(case("failed"), None).outcome == "failed"
    assert apply_xfail(case("failed"), XFail(reason="r")).outcome == "xfailed"
    assert apply_xfail(case("passed"), XFail(reason="r")).outcome == "xpassed"
    strict = apply_xfail(case("passed"), XFail(reason="r", strict=True))
    assert strict.outcome == "failed" and strict.checks[-1].name == XPASS_STRICT
    assert apply_xfail(case("failed"), XFail(reason="r", strict=True)).outcome == "xfailed"


def test_spec_outcome_comes_from_its_cases_final_outcomes():
    from types import SimpleNamespace

    from sft_spec.reports import ExpectationReport, SpecReport
    from sft_spec.spec import XfailSpec as XFail
    from sft_spec_plugins.run.protocol import spec_outcome

    def spec(xfail, *outcomes):
        cases = [ExpectationReport(nodeid=f"x{i}", index=i, prompt=[], location="x", outcome=o)
                 for i, o in enumerate(outcomes)]
        item = SimpleNamespace(spec=SimpleNamespace(xfail=xfail))
        return spec_outcome(item, SpecReport(nodeid="x", path="x", name="x", variant=None, outcome="passed",
                                             expectations=cases))

    assert spec(None, "passed", "xfailed", "xpassed") == "passed"
    assert spec(None, "passed", "failed") == "failed"
    mark = XFail(reason="r", strict=True)
    assert spec(mark, "xfailed", "xpassed") == "xfailed"
    assert spec(mark, "xpassed", "xpassed") == "xpassed"
    assert spec(mark, "failed", "xfailed") == "failed"


BLAMED = """\
model: builtin:tiny-gemma
method: lora
lora: {r: 8, lora_alpha: 16, lora_dropout: 0.1}
training:
  learning_rate: 1.0e-3
  adam_beta1: 0.9
  lr_scheduler_kwargs: {bogus: 1}
format: {collator: completion_only}
data:
  conversations:
    - - {role: user, content: a}
      - {role: assistant, content: b}
expect:
  - {prompt: a, equals: b}
"""


@pytest.mark.parametrize("phase,message,line", [
    ("train", "dropout probability has to be between 0 and 1", 3),        # a key's own word: lora_dropout
    ("train", "Invalid beta parameter at index 0: 1.5", 6),               # adam_beta1, by its word
    ("train", "__init__() got an unexpected keyword argument 'bogus'", 7),  # a key inside a mapping
    ("train", "LoRA layers do not match the model", 3),                    # a LoRA run's lora: section
    ("train", "CUDA error: device-side assert triggered", 4),             # the phase's section: training:
    ("mask", "response template not found", 8),                           # format.collator
    ("load", "weights could not be read", 1),                             # model:
])
def test_a_crash_is_blamed_on_the_key_it_most_likely_comes_from(tmp_path, phase, message, line):
    from conftest import load_context

    from sft_spec.loading import load_spec_file
    from sft_spec_plugins.run.protocol import blamed_location

    path = tmp_path / "b.sft.yaml"
    path.write_text(BLAMED, encoding="utf-8")
    item = load_spec_file(path, load_context(tmp_path))[0]
    assert blamed_location(item, phase, message).line == line
