"""``sft-spec import trl|axolotl``: configs written in the shape the two projects document become specs that
validate and run, with every key carried over or named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).parent / "configs"
SHAREGPT = '{"conversations": [{"from": "human", "value": "微调测试"}, {"from": "gpt", "value": "我学会了"}]}\n'
MESSAGES = '{"messages": [{"role": "user", "content": "微调测试"}, {"role": "assistant", "content": "我学会了"}]}\n'
ALPACA = '{"instruction": "微调测试", "input": "", "output": "我学会了"}\n'


@pytest.fixture
def project(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sharegpt.jsonl").write_text(SHAREGPT, encoding="utf-8")
    (tmp_path / "data" / "train.jsonl").write_text(MESSAGES, encoding="utf-8")
    (tmp_path / "data" / "alpaca.jsonl").write_text(ALPACA, encoding="utf-8")
    for config in CONFIGS.iterdir():
        shutil.copy(config, tmp_path / config.name)
    return tmp_path


@pytest.mark.parametrize("kind,config,model", [
    ("trl", "trl_sft.yaml", "builtin:tiny-gemma"),
    ("axolotl", "axolotl_lora.yml", "builtin:tiny-chatml"),
    ("axolotl", "axolotl_alpaca_qlora.yml", "builtin:tiny-gemma"),
])
def test_an_imported_config_validates_and_runs(sft, project, kind, config, model):
    result = sft("import", kind, project / config, "--model", model)
    assert result.code == 0, result.out + result.err
    spec_path = project / (config.split(".")[0] + ".sft.yaml")
    assert "1 specs, 2 checks valid" in result.out
    ran = sft("run", spec_path, "--no-cache")
    assert ran.code == 0, ran.out


def test_trl_keys_are_carried_over_or_named(sft, project):
    sft("import", "trl", project / "trl_sft.yaml")
    text = (project / "trl_sft.sft.yaml").read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    assert spec["model"] == {"id": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16"}
    assert spec["method"] == "lora" and spec["lora"]["r"] == 16 and spec["lora"]["target_modules"][0] == "q_proj"
    assert spec["training"]["learning_rate"] == 0.01 and spec["training"]["packing"] is False
    assert spec["data"] == {"files": [{"path": "data/train.jsonl"}]}
    for dropped in ("attn_implementation", "report_to: \"wandb\"", "output_dir", "push_to_hub", "hub_model_id"):
        assert f"# {dropped}" in text, text
    original = yaml.safe_load((project / "trl_sft.yaml").read_text(encoding="utf-8"))
    covered = {*spec["training"], "model_name_or_path", "model_revision", "torch_dtype", "datasets", "use_peft",
               *(f"lora_{k}" for k in ("r", "alpha", "dropout", "target_modules"))}
    named = {line.split(":")[0][2:] for line in text.splitlines() if line.startswith("# ") and "not carried" in line}
    assert set(original) <= covered | named  # nothing silently dropped


def test_axolotl_keys_are_carried_over_or_named(sft, project):
    sft("import", "axolotl", project / "axolotl_lora.yml")
    text = (project / "axolotl_lora.sft.yaml").read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    assert spec["data"]["files"][0] == {"path": "data/sharegpt.jsonl", "layout": "messages",
                                        "conversation_key": "conversations", "role_key": "from",
                                        "content_key": "value", "role_map": {"human": "user", "gpt": "assistant"}}
    assert spec["training"]["max_length"] == 2048 and spec["training"]["optim"] == "adamw_8bit"
    assert "<|im_start|>" in spec["format"]["template"]
    for dropped in ("sample_packing", "pad_to_sequence_len", "wandb_project", "output_dir", "flash_attention",
                    "val_set_size", "special_tokens", "dataset_prepared_path"):
        assert f"# {dropped}:" in text, text
    qlora = sft("import", "axolotl", project / "axolotl_alpaca_qlora.yml")
    assert qlora.code == 0
    spec = yaml.safe_load((project / "axolotl_alpaca_qlora.sft.yaml").read_text(encoding="utf-8"))
    assert spec["method"] == "qlora" and spec["lora"]["target_modules"] == "all-linear"
    assert spec["data"]["files"][0]["layout"] == "prompt_completion"
    assert "# plugins:" in (project / "axolotl_alpaca_qlora.sft.yaml").read_text(encoding="utf-8")


def test_an_existing_spec_is_not_overwritten(sft, project):
    assert sft("import", "trl", project / "trl_sft.yaml").code == 0
    again = sft("import", "trl", project / "trl_sft.yaml")
    assert again.code == 4 and "exists; pass --force" in again.err
