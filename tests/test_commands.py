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

    again = sft("init", "myspecs")
    assert again.code == 4 and "exists; pass --force" in again.err
    assert sft("init", "myspecs", "--force").code == 0
