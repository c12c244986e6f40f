"""Untrusted content: specs come from pull requests, so nothing in one may run code or reach outside.

YAML is loaded as plain data (no object tags); Jinja2 templates render in a sandbox; remote model code
needs the run's ``--allow-remote-code``; a spec cannot choose where files go or publish a model; data
and template paths stay inside the spec directory. Each refusal is an error for that spec only.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import load_context

from sft_spec import hookimpl
from sft_spec.cli import main
from sft_spec.errors import SpecError, SpecErrors
from sft_spec.loading import load_spec_file

CONVERSATION = """\
data:
  conversations:
    - - {role: user, content: 微调测试}
      - {role: assistant, content: 我学会了}
"""
GOOD = (
    """\
model: builtin:tiny-gemma
training: {num_train_epochs: 30, learning_rate: 3.0e-3, per_device_train_batch_size: 8}
"""
    + CONVERSATION
    + """\
expect:
  - prompt: 微调测试
    equals: 我学会了
"""
)
ESCAPE_TEMPLATE = (
    """\
model: builtin:tiny-gemma
format:
  formatter: template
  template: "{% for m in messages %}{{ ''.__class__.__mro__[1].__subclasses__() }}{{ m.content }}{% endfor %}"
  response_template: "x"
"""
    + CONVERSATION
    + """\
checks: {loss_decreased: true}
"""
)
# format.template with the default formatter goes through the tokenizer's own (sandboxed) renderer.
ESCAPE_CHAT_TEMPLATE = (
    """\
model: builtin:tiny-gemma
format:
  template: "{{ cycler.__init__.__globals__ }}{% for m in messages %}{{ m.content }}{% endfor %}"
"""
    + CONVERSATION
    + """\
checks: {loss_decreased: true}
"""
)
REMOTE_CODE = (
    """\
model: {id: builtin:tiny-gemma, trust_remote_code: true}
training: {num_train_epochs: 4, learning_rate: 3.0e-3, logging_steps: 1}
"""
    + CONVERSATION
    + """\
checks: {loss_decreased: true}
"""
)


@dataclass
class Recorder:
    reports: list = field(default_factory=list)

    @hookimpl
    def sft_spec_log_report(self, report, session):
        self.reports.append(report)

    def outcome(self, name: str):
        found = [r for r in self.reports if r.nodeid.endswith(f"::{name}")]
        assert len(found) == 1, [r.nodeid for r in self.reports]
        return found[0]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_errors(path: Path, root: Path) -> list[SpecError]:
    ctx = load_context(root)
    with pytest.raises(SpecError) as info:
        load_spec_file(path, ctx)
    return info.value.errors if isinstance(info.value, SpecErrors) else [info.value]


def test_sandbox_escapes_and_remote_code_fail_only_their_spec(tmp_path, capsys):
    write(tmp_path, "good.sft.yaml", GOOD)
    write(tmp_path, "escape_template.sft.yaml", ESCAPE_TEMPLATE)
    write(tmp_path, "escape_chat_template.sft.yaml", ESCAPE_CHAT_TEMPLATE)
    write(tmp_path, "remote_code.sft.yaml", REMOTE_CODE)
    recorder = Recorder()
    code = main(["run", str(tmp_path), "--device", "cpu"], plugins=[recorder])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 1
    assert "Traceback" not in text
    assert recorder.outcome("good").outcome == "passed"
    for name, attribute in (("escape_template", "__class__"), ("escape_chat_template", "__init__")):
        report = recorder.outcome(name)
        assert report.outcome == "error"
        assert "SecurityError" in report.error.message and "unsafe" in report.error.message
        assert attribute in report.error.message
        assert not report.error.traceback  # a refused template is the spec's fault, not a crash
    remote = recorder.outcome("remote_code")
    assert remote.outcome == "error"
    assert "trust_remote_code" in remote.error.message and "--allow-remote-code" in remote.error.message
    assert "SecurityError" in text and "--allow-remote-code" in text


def test_allow_remote_code_lifts_the_refusal(tmp_path, capsys):
    # The refusal above is the flag's doing: with it, the same spec trains (tiny-gemma has no remote code).
    write(tmp_path, "remote_code.sft.yaml", REMOTE_CODE)
    recorder = Recorder()
    code = main(["run", str(tmp_path), "--device", "cpu", "--allow-remote-code"], plugins=[recorder])
    capsys.readouterr()
    assert recorder.outcome("remote_code").outcome == "passed"
    assert code == 0


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("output_dir", "/tmp/elsewhere", "sft-spec writes run files under its own output folder"),
        ("logging_dir", "logs", "sft-spec writes run files under its own output folder"),
        ("push_to_hub", "true", "a spec may not publish models"),
        ("hub_model_id", "me/model", "a spec may not publish models"),
        ("hub_token", "hf_xxx", "a spec may not publish models"),
        ("resume_from_checkpoint", "ckpt", "each run trains from the base model"),
    ],
)
def test_spec_cannot_choose_output_or_publish(tmp_path, key, value, reason):
    path = write(
        tmp_path,
        "managed.sft.yaml",
        GOOD.replace("per_device_train_batch_size: 8}", f"per_device_train_batch_size: 8, {key}: {value}}}"),
    )
    errors = load_errors(path, tmp_path)
    assert len(errors) == 1 and errors[0].key == f"training.{key}"
    assert f"{key!r} cannot be set in a spec: {reason}" in errors[0].message
    assert errors[0].location is not None and errors[0].location.line == 2


def test_matrix_and_defaults_cannot_sneak_in_managed_keys(tmp_path):
    spec = write(
        tmp_path,
        "sub/matrix.sft.yaml",
        GOOD + "matrix:\n  - {id: a}\n  - {id: b, training: {push_to_hub: true}}\n",
    )
    errors = load_errors(spec, tmp_path)
    assert len(errors) == 1 and "'push_to_hub' cannot be set" in errors[0].message
    assert errors[0].key == "matrix[1].training.push_to_hub" and errors[0].location.line == 12

    write(tmp_path, "sub/sft-defaults.yaml", "training:\n  output_dir: /tmp/elsewhere\n")
    errors = load_errors(spec, tmp_path)
    assert any(
        "'output_dir' cannot be set" in e.message
        and e.location.path.endswith("sft-defaults.yaml")
        and e.location.line == 2
        for e in errors
    ), [str(e) for e in errors]


@pytest.mark.parametrize(
    "tag",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        '!!python/object/new:os.system ["touch {marker}"]',
        "!!python/name:os.system",
        "!!python/module:os",
        "!!python/object/apply:subprocess.check_call [[touch, {marker}]]",
    ],
)
def test_yaml_never_constructs_python_objects(tmp_path, tag):
    marker = tmp_path / "pwned"
    path = write(
        tmp_path,
        "tag.sft.yaml",
        f"model: builtin:tiny-gemma\ndescription: {tag.format(marker=marker)}\n" + CONVERSATION,
    )
    errors = load_errors(path, tmp_path)
    assert not marker.exists()
    assert len(errors) == 1 and "is not allowed: a spec is plain data" in errors[0].message
    assert (errors[0].location.line, errors[0].location.column) == (2, 14)


def test_symlinks_out_of_the_spec_directory_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    (outside / "template.jinja").write_text("{{ messages }}", encoding="utf-8")
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "data.jsonl").symlink_to(outside / "secret.jsonl")
    (specs / "chat.jinja").symlink_to(outside / "template.jinja")
    path = write(
        specs,
        "links.sft.yaml",
        GOOD.replace(
            "data:\n  conversations:",
            "format: {template: chat.jinja}\ndata:\n  files: [{path: data.jsonl}]\n  conversations:",
        ),
    )
    errors = load_errors(path, specs)
    messages = sorted((e.key, e.message) for e in errors)
    assert [k for k, _ in messages] == ["data.files[0].path", "format.template"]
    assert all("is outside the spec directory" in m for _, m in messages)


def test_template_loops_are_bounded_by_the_sandbox(tmp_path, capsys):
    # range() in the sandbox refuses huge ranges, so a template cannot spin forever on one loop.
    slow = ESCAPE_TEMPLATE.replace(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% for i in range(10**12) %}{% endfor %}"
    )
    write(tmp_path, "loop.sft.yaml", slow)
    recorder = Recorder()
    code = main(["run", str(tmp_path), "--device", "cpu"], plugins=[recorder])
    capsys.readouterr()
    report = recorder.outcome("loop")
    assert code == 1 and report.outcome == "error"
    assert "format.template failed" in report.error.message and "range" in report.error.message.lower()


def test_paths_stay_inside_the_spec_folder_whatever_folder_the_run_starts_from(tmp_path, monkeypatch, sft):
    """One rule for `sft-spec run` and `pytest`: before, `../` data was accepted when the run started from a
    higher folder (the common folder of the paths), and pytest used its rootdir instead."""
    import subprocess
    import sys

    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    write(tmp_path, "specs/shared/data.jsonl",
          '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    write(tmp_path, "specs/team/up.sft.yaml", GOOD.replace(
        "data:\n  conversations:", "data:\n  files: [{path: ../shared/data.jsonl}]\n  conversations:"))
    monkeypatch.chdir(tmp_path)
    message = "data.files[0].path: data file '../shared/data.jsonl' is outside the spec directory specs/team"
    for start in ("specs", "specs/team", "."):
        result = sft("validate", start)
        assert result.code == 1 and message in result.out, (start, result.out)
    env = {**__import__("os").environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "sft_spec", "-p", "no:cacheprovider", "specs/",
                          "--co"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert message in run.stdout, run.stdout
