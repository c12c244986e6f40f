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


def outside_values(tmp_path: Path) -> list[str]:
    (tmp_path / "outside.json").write_text("{}", encoding="utf-8")
    return ["../outside.json", str(tmp_path / "outside.json"), "~/outside.json"]


def training_path_fields() -> list[str]:
    from sft_spec.config import default_cache_dir
    from sft_spec_plugins.train import recipe_policy
    from sft_spec_plugins.train.recipe_fields import path_fields, recipe_fields

    fields = path_fields(recipe_fields(default_cache_dir())["training"])
    return sorted(name for name in fields if recipe_policy.kind("training", name) != "refused")


def test_the_path_fields_are_found_from_types_names_and_help():
    # Not a hand list: the rule finds TRL's file-valued fields, and the policy table agrees with it.
    from sft_spec_plugins.train import recipe_policy

    found = set(training_path_fields())
    assert {"deepspeed", "fsdp_config", "accelerator_config", "chat_template_path"} <= found
    assert {n for n, (kind, _) in recipe_policy.TRAINING.items() if kind == "path"} <= found


@pytest.mark.parametrize("field", training_path_fields())
def test_every_file_valued_training_field_stays_inside_the_spec_folder(tmp_path, field):
    """The class: whatever the field, a path outside the spec's folder is an error at its key."""
    specs = tmp_path / "specs"
    for value in outside_values(tmp_path):
        text = GOOD.replace("per_device_train_batch_size: 8}", f"per_device_train_batch_size: 8, {field}: {value!r}}}")
        errors = load_errors(write(specs, f"{field}.sft.yaml", text), specs)
        mine = [e for e in errors if e.key == f"training.{field}"]
        assert mine and mine[0].location.line == 2, [str(e) for e in errors]
        assert "outside the spec directory" in mine[0].message or "absolute path" in mine[0].message


def test_launcher_config_files_stay_inside_the_spec_folder(tmp_path):
    specs = tmp_path / "specs"
    for value in outside_values(tmp_path):
        errors = load_errors(write(specs, "l.sft.yaml", GOOD + f"launcher: {{config_file: {value!r}}}\n"), specs)
        assert [e.key for e in errors] == ["launcher.config_file"], [str(e) for e in errors]


def test_a_defaults_file_that_links_out_is_refused(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n", encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "sft-defaults.yaml").write_text("training: {learning_rate: 1.0}\n", encoding="utf-8")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "sft-defaults.yaml").symlink_to(tmp_path / "elsewhere" / "sft-defaults.yaml")
    errors = load_errors(write(tmp_path / "specs" / "team", "x.sft.yaml", GOOD), tmp_path)
    assert any("sft-defaults.yaml" in e.message and "outside" in e.message for e in errors), [str(e) for e in errors]


def test_defaults_of_parent_folders_apply_whatever_path_the_run_is_given(tmp_path, monkeypatch, sft):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n", encoding="utf-8")
    write(tmp_path, "sft-defaults.yaml", "tags: [from-the-root]\n")
    path = write(tmp_path / "specs" / "team", "x.sft.yaml", GOOD)
    monkeypatch.chdir(tmp_path / "specs")
    for given in (path, path.parent, tmp_path / "specs"):
        result = sft("run", "--co", given)
        assert "tags: from-the-root" in result.out, (given, result.out)


def test_a_symlink_loop_in_a_data_folder_is_an_error_for_its_spec(tmp_path, sft):
    specs = tmp_path / "specs"
    (specs / "data").mkdir(parents=True)
    (specs / "data" / "loop.jsonl").symlink_to(specs / "data" / "loop.jsonl")
    (specs / "data" / "subloop").symlink_to(specs / "data")  # a folder loop, for the collector's walk
    write(specs, "loop.sft.yaml", GOOD.replace("data:\n  conversations:",
                                               "data:\n  files: [{path: data/loop.jsonl}]\n  conversations:"))
    write(specs, "fine.sft.yaml", GOOD)
    result = sft("run", specs, "--co")
    assert result.code == 1 and "Traceback" not in result.out + result.err
    assert "data.files[0].path: data file 'data/loop.jsonl' cannot be resolved" in result.out
    assert "fine.sft.yaml::fine" in result.out


def test_an_unreadable_data_file_is_an_error_for_its_spec(tmp_path, sft, monkeypatch):
    specs = tmp_path / "specs"
    write(specs, "data/d.jsonl", '{"messages": [{"role": "user", "content": "a"}, '
          '{"role": "assistant", "content": "b"}]}\n')
    write(specs, "u.sft.yaml", GOOD.replace("data:\n  conversations:",
                                            "data:\n  files: [{path: data/d.jsonl}]\n  conversations:"))
    real = Path.read_bytes

    def unreadable(self):
        if self.name == "d.jsonl":
            raise PermissionError(13, "Permission denied")  # root reads anything: a chmod would not do it
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    result = sft("validate", specs)
    assert result.code == 1 and "cannot read data file data/d.jsonl: Permission denied" in result.out


def test_defaults_lookup_ends_at_the_project_root_or_rootdir(tmp_path, sft):
    """Outside a project only the spec's own folder counts; --rootdir ends the walk below the project root."""
    write(tmp_path, "sft-defaults.yaml", "tags: [stray]\n")  # no pyproject.toml above: not a project
    path = write(tmp_path / "team", "x.sft.yaml", GOOD)
    assert "tags: stray" not in sft("run", "--co", path).out
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n", encoding="utf-8")
    assert "tags: stray" in sft("run", "--co", path).out
    assert "tags: stray" not in sft("run", "--co", "--rootdir", tmp_path / "team", path).out


def test_a_spec_file_linked_from_outside_its_folder_is_refused(tmp_path, sft):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "creds.yaml").write_text("AWS_SECRET_ACCESS_KEY: hunter2\n", encoding="utf-8")
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "evil.sft.yaml").symlink_to(outside / "creds.yaml")
    result = sft("validate", specs)
    assert result.code == 1 and "spec file 'evil.sft.yaml' is outside the spec directory" in result.out
    assert "hunter2" not in result.out and "AWS_SECRET" not in result.out


def test_a_hostile_prompt_length_is_refused_at_its_key(tmp_path, sft, write_spec):
    from conftest import GEMMA_ONE_ANSWER

    text = GEMMA_ONE_ANSWER.format(method="lora", epochs=1, lr=1e-3).replace("- prompt: 微调测试",
                                                                             "- prompt: " + "长" * 20000)
    result = sft("validate", write_spec("long.sft.yaml", text))
    assert result.code == 1 and "the prompt has 20000 characters; a prompt may have 16384" in result.out
