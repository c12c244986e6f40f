"""The command line as a user meets it: exit codes as pytest's, errors with locations, a quick validate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_a_typo_is_an_error_with_location_and_the_other_specs_still_run(sft, write_spec, one_answer_spec):
    folder = write_spec("good.sft.yaml", one_answer_spec(method="lora", epochs=30)).parent
    write_spec("typo.sft.yaml", one_answer_spec().replace("learning_rate", "learnin_rate"))
    result = sft("run", folder)
    assert result.code == 1
    assert "typo.sft.yaml:4:" in result.out
    assert "unknown trl.SFTConfig field 'learnin_rate'. Did you mean: learning_rate?" in result.out
    good = result.recorder.by_id("good.sft.yaml::good")
    assert good.outcome == "passed"
    assert "Traceback" not in result.out
    assert result.out.rstrip().splitlines()[-1].count("1 passed, 1 error")


def test_bad_option_and_missing_path_exit_4(sft, tmp_path):
    assert sft("run", "--no-such-option").code == 4
    missing = sft("run", tmp_path / "nope")
    assert missing.code == 4
    assert "file or directory not found" in missing.err


def test_no_specs_collected_exits_5(sft, tmp_path):
    assert sft("run", tmp_path).code == 5


def test_validate_checks_without_training(sft, write_spec, one_answer_spec):
    path = write_spec("ok.sft.yaml", one_answer_spec())
    result = sft("validate", path)
    assert result.code == 0
    assert "1 spec, 1 check valid" in result.out
    bad = write_spec("bad.sft.yaml", one_answer_spec().replace("method: lora", "method: lroa"))
    result = sft("validate", bad)
    assert result.code == 1
    assert "bad.sft.yaml:2:1: method: invalid value 'lroa'" in result.out
    assert "Did you mean: lora" in result.out


def test_old_trl_names_are_accepted_with_a_note(sft, write_spec, one_answer_spec):
    text = one_answer_spec().replace("batch_size: 8", "batch_size: 8, max_seq_length: 256")
    result = sft("run", "--collect-only", write_spec("old.sft.yaml", text))
    assert result.code == 0
    assert "training.max_seq_length is now max_length" in result.out


def test_collect_only_lists_ids_and_k_selects(sft, write_spec, one_answer_spec):
    text = one_answer_spec() + "  - prompt: 你好\n    not_contains: 我学会了\n"
    text += "matrix:\n  - {id: full, method: full}\n  - {id: lora}\n"
    path = write_spec("ids.sft.yaml", text)
    result = sft("run", "--co", "-q", path)
    ids = [line for line in result.out.splitlines() if "::" in line]
    assert any(line.endswith("ids.sft.yaml::ids[full]::expect[0]") for line in ids)
    assert any(line.endswith("ids.sft.yaml::ids[lora]::expect[1]") for line in ids)
    assert len(ids) == 4
    selected = sft("run", "--co", "-q", "-k", "lora and expect[1]", path)
    chosen = [line for line in selected.out.splitlines() if "::" in line]
    assert len(chosen) == 1 and chosen[0].endswith("ids[lora]::expect[1]")
    none = sft("run", "--co", "-q", "-k", "nothing-matches", path)
    assert none.code == 5
    assert sft("run", "--co", "-k", "lora and (", path).code == 4


def test_tags_select_with_m(sft, write_spec, one_answer_spec):
    folder = write_spec("smoke.sft.yaml", "tags: [smoke]\n" + one_answer_spec()).parent
    write_spec("slow.sft.yaml", "tags: [slow]\n" + one_answer_spec())
    result = sft("run", "--co", "-m", "smoke and not slow", folder)
    assert "smoke.sft.yaml::smoke" in result.out
    assert "slow.sft.yaml" not in result.out.replace("deselected", "")


def test_help_and_collect_only_do_not_import_torch(write_spec, one_answer_spec, tmp_path):
    path = write_spec("fast.sft.yaml", one_answer_spec())
    code = (
        "import sys; from sft_spec.cli import main; "
        f"rc = main(['run', '--co', {str(path)!r}]); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules); "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    done = subprocess.run([sys.executable, "-m", "sft_spec", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "run" in done.stdout


def test_plugins_command_lists_builtins_and_hooks(sft):
    result = sft("plugins")
    assert result.code == 0
    for name in ("formatters", "collators", "trainer", "models", "checks", "terminal"):
        assert f"\n{name} " in "\n" + result.out
    assert "collators: completion_only, assistant_only, full" in result.out
    assert "sft_spec_make_mask" in result.out


def test_pyproject_addopts_apply(sft, write_spec, one_answer_spec, tmp_path, monkeypatch):
    write_spec("x.sft.yaml", "tags: [smoke]\n" + one_answer_spec(), folder=tmp_path / "specs")
    write_spec("y.sft.yaml", "tags: [other]\n" + one_answer_spec(), folder=tmp_path / "specs")
    (tmp_path / "pyproject.toml").write_text('[tool.sft-spec]\naddopts = "-m smoke"\n')
    monkeypatch.chdir(tmp_path)
    result = sft("run", "--co")
    assert "x.sft.yaml::x" in result.out and "y.sft.yaml::y" not in result.out


@pytest.mark.parametrize("args,env,coloured", [
    (["--color", "yes"], {}, True),
    ([], {"FORCE_COLOR": "1"}, True),
    (["--color", "no"], {"FORCE_COLOR": "1"}, False),
    ([], {"FORCE_COLOR": "1", "NO_COLOR": "1"}, False),
    ([], {"PY_COLORS": "1", "NO_COLOR": "1"}, True),
    ([], {}, False),  # captured output is no terminal
])
def test_color_as_pytest_decides_it(sft, write_spec, monkeypatch, args, env, coloured):
    for name in ("FORCE_COLOR", "NO_COLOR", "PY_COLORS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = write_spec("s.sft.yaml", """\
        model: builtin:tiny-gemma
        skip: not today
        data: {conversations: [[{role: user, content: a}, {role: assistant, content: b}]]}
        expect: [{prompt: a, equals: b}]
        """)
    result = sft("run", spec, *args)
    assert ("\x1b[" in result.out) is coloured, result.out


def test_a_ci_log_without_v_gets_a_heartbeat_during_a_long_run(sft, write_spec, one_answer_spec, monkeypatch):
    from sft_spec_plugins.report import terminal

    quiet = sft("run", write_spec("a.sft.yaml", one_answer_spec(epochs=3)), "--no-cache")
    assert "running for" not in quiet.out  # a short run, under a minute: nothing more than its line
    monkeypatch.setattr(terminal, "HEARTBEAT_SECONDS", 0.0)  # as if every step came a minute after the last
    beating = sft("run", write_spec("b.sft.yaml", one_answer_spec(epochs=3)), "--no-cache")
    lines = [line for line in beating.out.splitlines() if "running for" in line]
    assert any("b.sft.yaml::b train 3/3" in line for line in lines), beating.out


def test_counts_agree_with_what_is_listed(sft, write_spec):
    # "1 error collected" stood above a file's two located errors, and "(1 checks)" in the header.
    write_spec("two.sft.yaml", "model: builtin:tiny-gemma\nmodle: x\ntrainin: {}\n")
    folder = write_spec("one.sft.yaml", "model: builtin:tiny-gemma\nskip: later\ndata:\n  conversations:\n"
                        "    - - {role: user, content: a}\n      - {role: assistant, content: b}\n"
                        "expect:\n  - {prompt: a, equals: b}\n").parent
    result = sft("validate", folder)
    assert result.out.count("unknown key") == 2
    assert "1 spec, 1 check, 3 errors in 1 file collected" in result.out, result.out  # data is missing too
    result = sft("run", folder)
    assert "collected 1 spec (1 check) / 3 errors in 1 file" in result.out, result.out
    assert "1 error in" in result.out.splitlines()[-1]  # the file, counted once at the end, as pytest does


def test_durations_say_where_a_runs_seconds_went(sft, write_spec, one_answer_spec):
    # A tiny model "loaded" for 13 s: the library imports were inside the load phase, and nothing said so.
    path = write_spec("d.sft.yaml", one_answer_spec(epochs=1))
    result = sft("run", path, "--no-cache", "--durations", "3")
    section = result.out.split("slowest 3 durations", 1)[1].splitlines()[1:]
    section = section[:next(i for i, line in enumerate(section) if line.startswith("="))]
    lines = [line.split() for line in section if line.endswith("d.sft.yaml::d")]
    assert len(lines) == 3 and "train" in {phase for _, phase, _ in lines}, section
    seconds = [float(s.rstrip("s")) for s, _, _ in lines]
    assert seconds == sorted(seconds, reverse=True)
    report = result.recorder.reports[0]
    assert {"import", "load", "train"} <= set(report.phases), report.phases
    sft("run", path)  # stored in the result cache (or found there: another test may have run this spec)
    rerun = sft("run", path, "--durations", "0")
    assert "1 spec reused from the result cache: no time spent" in rerun.out, rerun.out
