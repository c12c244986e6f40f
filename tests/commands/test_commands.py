"""`sft-spec schema` and `sft-spec init`."""

from __future__ import annotations

import json


def test_schema_completes_checks_and_recipe_fields(sft):
    result = sft("schema")
    assert result.code == 0
    schema = json.loads(result.out)
    props = schema["properties"]
    assert {"model", "data", "expect", "training", "lora", "launcher"} <= set(props)
    item = props["expect"]["items"]
    assert item["required"] == ["prompt"] and item["additionalProperties"] is False
    assert {"prompt", "before", "equals", "not_contains", "regex", "similar"} <= set(item["properties"])
    assert "equals" in item["properties"]["before"]["properties"]
    assert "loss_decreased" in props["checks"]["properties"]
    training = props["training"]["properties"]
    assert training["learning_rate"]["type"] == "number"
    assert training["num_train_epochs"]["type"] == "number"
    assert "adamw_torch" in training["optim"]["enum"]
    assert training["max_seq_length"]["deprecated"] is True
    assert props["lora"]["properties"]["r"]["type"] == "integer"
    # Shorthands the loader accepts: `model: builtin:tiny-gemma`, `tags: smoke`.
    assert {"type": "string", "description": "model id"} in props["model"]["anyOf"]
    assert {"type": "string"} in props["tags"]["anyOf"]


def test_schema_to_file(sft, tmp_path):
    out = tmp_path / "sft-spec.schema.json"
    assert sft("schema", "-o", out).code == 0
    assert json.loads(out.read_text(encoding="utf-8"))["title"].startswith("sft-spec")


def test_init_writes_a_spec_that_passes(sft, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = sft("init", "myspecs")
    assert made.code == 0, made.err
    spec = tmp_path / "myspecs" / "first.sft.yaml"
    assert spec.is_file() and (tmp_path / "myspecs" / "data" / "first.jsonl").is_file()
    assert "sft-spec run myspecs/" in (tmp_path / "myspecs" / "README.md").read_text(encoding="utf-8")

    run = sft("run", "myspecs", "--no-cache")
    assert run.code == 0, run.out
    assert [c.outcome for r in run.recorder.reports for c in r.cases] == ["passed", "passed"]

    # Every command the written README suggests selects something (its -k once named the prompt: exit 5).
    readme = (tmp_path / "myspecs" / "README.md").read_text(encoding="utf-8")
    for line in (line for line in readme.splitlines() if line.startswith("sft-spec run ")):
        args = line.split("#")[0].split()[2:]
        listed = sft("run", *args, "--co", "-q")
        assert listed.code == 0 and "first.sft.yaml::" in listed.out, (line, listed.out)

    again = sft("init", "myspecs")
    assert again.code == 4 and "exists; pass --force" in again.err
    assert sft("init", "myspecs", "--force").code == 0


def test_every_spec_in_the_repo_validates_against_the_schema(sft):
    """The editor schema must accept what the loader accepts: every spec shipped in specs/ and examples/."""
    from pathlib import Path

    import yaml
    from jsonschema import Draft202012Validator

    schema = json.loads(sft("schema").out)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    repo = Path(__file__).resolve().parents[2]
    paths = sorted([*repo.glob("specs/**/*.sft.yaml"), *repo.glob("examples/**/*.sft.yaml")])
    assert len(paths) >= 7
    problems = []
    for path in paths:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        doc.pop("matrix", None)  # entries are partial specs, merged by the loader
        problems += [f"{path.relative_to(repo)}: {'/'.join(map(str, e.path))}: {e.message}"
                     for e in validator.iter_errors(doc)]
    assert problems == []


def test_the_schema_rejects_what_the_loader_rejects(sft):
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(json.loads(sft("schema").out))
    good = {"model": "builtin:tiny-gemma", "data": {"conversations": [[{"role": "user", "content": "a"},
                                                                       {"role": "assistant", "content": "b"}]]},
            "expect": [{"prompt": "a", "equals": "b", "xfail": "known"}]}
    assert list(validator.iter_errors(good)) == []
    typo = {**good, "expect": [{"prompt": "a", "equalz": "b"}]}
    assert [e.validator for e in validator.iter_errors(typo)] == ["additionalProperties"]
    # TRL's and peft's fields are listed, so an editor flags a typo there too, as validation does.
    for section, key in (("training", "learning_rat"), ("lora", "lora_alfa"), ("quantization", "load_in_5bit")):
        typo = {**good, section: {key: 1}}
        assert [e.validator for e in validator.iter_errors(typo)] == ["additionalProperties"], section
    renamed = {**good, "training": {"gradient_checkpointing": True, "learning_rate": 1e-3}}
    assert list(validator.iter_errors(renamed)) == []  # accepted with a note, as the loader does


def test_schema_descriptions_read_as_written():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sft_spec", "schema"], capture_output=True, text=True).stdout
    assert "%%" not in out and "~20% slower" in out


DUP = """\
from sft_spec import hookimpl
from sft_spec.registry import Check, CheckResult


@hookimpl
def sft_spec_register_checks(register):
    register(Check("equals", lambda answer, expected, ctx: CheckResult(True), "always true"))
"""


def test_plugins_lists_what_run_would_load_from_p_and_addopts(sft, tmp_path, monkeypatch):
    (tmp_path / "dup.py").write_text(DUP, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    given = sft("plugins", "-p", "dup")
    (tmp_path / "pyproject.toml").write_text('[tool.sft-spec]\naddopts = "-p dup -v"\n', encoding="utf-8")
    from_addopts = sft("plugins")
    for result in (given, from_addopts):
        assert result.code == 0, result.out + result.err
        assert "dup  (dup)" in result.out and "    checks: equals" in result.out.split("dup  (dup)")[1]
        assert "note: check 'equals' of plugin 'checks' is shadowed by plugin 'dup'" in result.out
