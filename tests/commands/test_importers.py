"""``sft-spec import trl|axolotl``: configs written in the shape the two projects document become specs that
validate and run, with every key carried over or named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
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
    assert "1 spec, 2 checks valid" in result.out
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
    covered = {*spec["training"], "gradient_checkpointing",  # written as activation_checkpointing, its new name
               "model_name_or_path", "model_revision", "torch_dtype", "datasets", "use_peft",
               *(f"lora_{k}" for k in ("r", "alpha", "dropout", "target_modules"))}
    named = {line.split(":")[0][2:] for line in text.splitlines() if line.startswith("# ") and "not carried" in line}
    assert set(original) <= covered | named  # nothing silently dropped


def test_axolotl_keys_are_carried_over_or_named(sft, project):
    sft("import", "axolotl", project / "axolotl_lora.yml")
    text = (project / "axolotl_lora.sft.yaml").read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    # roles_to_train (default: the assistant's) trains every assistant turn: assistant_only, not
    # completion_only (the last answer alone), as the imported comment used to say while writing the other.
    assert spec["format"]["collator"] == "assistant_only"
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


def _commented(text: str) -> set[str]:
    """The keys named in the spec's trailing comments, as ``key`` or ``datasets[0].key``."""
    return {line[2:].split(":")[0] for line in text.splitlines() if line.startswith("# ") and "not carried" in line}


def test_axolotl_lora_on_an_8bit_base_becomes_qlora_and_every_dataset_key_is_named(sft, project):
    result = sft("import", "axolotl", project / "axolotl_lora_8bit.yml", "--model", "builtin:tiny-gemma")
    assert result.code == 0, result.out + result.err  # the written spec validates
    text = (project / "axolotl_lora_8bit.sft.yaml").read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    assert spec["method"] == "qlora" and spec["quantization"] == {"load_in_8bit": True}
    assert spec["lora"] == {"r": 32, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear",
                            "modules_to_save": ["embed_tokens", "lm_head"]}
    assert spec["data"]["files"] == [{"path": "data/train.jsonl", "format": "json", "layout": "messages"}]
    named = _commented(text)
    # Keys that change which tokens carry the loss, or which turns are read, are never dropped in silence.
    assert {"datasets[0].train_on_eos", "datasets[0].drop_system_message", "datasets[0].field_system"} <= named, text
    assert spec["format"]["collator"] == "full"  # roles_to_train: [assistant, user]: every turn trains
    # gradient_checkpointing is written by its current name: validation would note the rename on each run.
    assert spec["training"]["activation_checkpointing"] is True and "gradient_checkpointing" not in spec["training"]
    carried = {"base_model", "load_in_8bit", "load_in_4bit", "datasets", "adapter", "lora_r", "lora_alpha",
               "lora_dropout", "lora_target_linear", "lora_modules_to_save", "sequence_len", "micro_batch_size",
               "num_epochs", "optimizer", "lr_scheduler", "learning_rate", "bf16", "tf32", "gradient_checkpointing",
               "logging_steps", "warmup_steps", "weight_decay", "gradient_accumulation_steps"}
    original = yaml.safe_load((project / "axolotl_lora_8bit.yml").read_text(encoding="utf-8"))
    assert set(original) - carried <= named, set(original) - carried - named
    assert spec["training"]["lr_scheduler_type"] == "cosine" and spec["training"]["warmup_steps"] == 10


def test_trl_mixtures_dtypes_and_quantization_keys_are_carried_or_named(sft, project):
    (project / "data" / "test.jsonl").write_text(MESSAGES, encoding="utf-8")
    result = sft("import", "trl", project / "trl_mixture.yaml", "--model", "builtin:tiny-gemma")
    assert result.code == 0, result.out + result.err
    text = (project / "trl_mixture.sft.yaml").read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    assert spec["data"] == {"files": [{"path": "data/train.jsonl"}]}  # the split that trains, not the mapping's keys
    assert spec["quantization"] == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                    "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "uint8"}
    named = _commented(text)
    assert {"dtype", "data_files.test", "datasets[0].data_dir", "dataset_test_split", "dataset_streaming",
            "lora_task_type", "output_dir"} <= named, text


def test_a_spec_written_to_another_folder_keeps_its_data_paths_right(sft, project):
    (project / "specs").mkdir()
    result = sft("import", "trl", project / "trl_sft.yaml", "-o", project / "specs" / "x.sft.yaml")
    spec = yaml.safe_load((project / "specs" / "x.sft.yaml").read_text(encoding="utf-8"))
    assert spec["data"]["files"] == [{"path": "../data/train.jsonl"}]
    assert "lies outside the spec's folder" in (project / "specs" / "x.sft.yaml").read_text(encoding="utf-8")
    assert result.code == 1 and "outside the spec directory" in result.out  # the spec-folder rule, said at once
    (project / "nested" / "data").mkdir(parents=True)
    shutil.copy(project / "data" / "train.jsonl", project / "nested" / "data" / "train.jsonl")
    shutil.copy(project / "trl_sft.yaml", project / "nested" / "trl_sft.yaml")
    moved = sft("import", "trl", project / "nested" / "trl_sft.yaml", "-o", project / "y.sft.yaml", "--model",
                "builtin:tiny-gemma")
    assert moved.code == 0, moved.out + moved.err
    assert yaml.safe_load((project / "y.sft.yaml").read_text(encoding="utf-8"))["data"]["files"] == [
        {"path": "nested/data/train.jsonl"}]


def test_blank_keys_hub_data_files_local_folders_and_bad_shapes(sft, project):
    (project / "blank.yml").write_text(
        "base_model: builtin:tiny-gemma\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n"
        "datasets:\n  - path: data/train.jsonl\n    type: chat_template\n    roles: [user, assistant]\n"
        "  - path: someone/hub-set\n    data_files: [train-00000.jsonl]\n"
        "fp16:\nmax_steps:\nseed:\nnum_epochs: 1\n", encoding="utf-8")
    result = sft("import", "axolotl", project / "blank.yml")
    text = (project / "blank.sft.yaml").read_text(encoding="utf-8")
    for key in ("fp16", "max_steps", "seed"):  # blank in YAML: axolotl's default, named, never copied as null
        assert f"# {key}: null  # not carried: left blank" in text, text
    assert "# datasets[0].roles:" in text and "# data_files:" in text, text
    assert "Traceback" not in result.out + result.err
    (project / "folder").mkdir()
    shutil.copy(project / "data" / "train.jsonl", project / "folder" / "part1.jsonl")
    shutil.copy(project / "data" / "train.jsonl", project / "folder" / "part2.jsonl")
    (project / "dir.yaml").write_text("model_name_or_path: builtin:tiny-gemma\ndataset_name: folder\n"
                                      "num_train_epochs: 1\n", encoding="utf-8")
    result = sft("import", "trl", project / "dir.yaml")
    assert result.code == 0, result.out + result.err  # a folder of data files, as load_dataset reads it
    spec = yaml.safe_load((project / "dir.sft.yaml").read_text(encoding="utf-8"))
    assert spec["data"]["files"] == [{"path": "folder/part1.jsonl"}, {"path": "folder/part2.jsonl"}]
    taken = sft("import", "trl", project / "dir.yaml", "-o", project / "folder")
    assert taken.code == 4 and "is a folder" in taken.err


def test_a_local_folder_is_read_as_load_dataset_reads_it_and_overridden_keys_are_named(sft, project):
    import datasets

    folder = project / "parts"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    shutil.copy(project / "data" / "train.jsonl", folder / "a.jsonl")
    shutil.copy(project / "data" / "train.jsonl", folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl")
    shutil.copy(project / "data" / "train.jsonl", folder / "_scratch.jsonl")
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "微调测试"},
                                              {"role": "assistant", "content": "我学会了"}]}]).save_to_disk(
        str(folder / "saved"))
    (project / "q.yml").write_text(
        "base_model: builtin:tiny-gemma\nadapter: lora\nload_in_8bit: false\nlora_r: 8\nlora_alpha: 16\n"
        "lora_target_linear: true\nlora_target_modules: [q_proj, v_proj]\nnum_epochs: 1\n"
        "datasets:\n  - path: parts\n    type: chat_template\n", encoding="utf-8")
    result = sft("import", "axolotl", project / "q.yml")
    assert result.code == 0, result.out + result.err
    text = (project / "q.sft.yaml").read_text(encoding="utf-8")
    paths = [f["path"] for f in yaml.safe_load(text)["data"]["files"]]
    assert paths == ["parts/a.jsonl", "parts/saved"]  # no hidden file, the saved folder as one entry
    assert "# lora_target_modules:" in text and "# load_in_8bit: false" in text, text


def test_trl_with_both_dataset_name_and_datasets_reads_datasets_as_trl_does(sft, project):
    config = project / "both.yaml"
    config.write_text("model_name_or_path: builtin:tiny-gemma\ndataset_name: trl-lib/Capybara\n"
                      "datasets:\n  - path: json\n    data_files: data/train.jsonl\n", encoding="utf-8")
    result = sft("import", "trl", config)
    assert result.code == 0, result.out + result.err  # the written spec validates
    text = (project / "both.sft.yaml").read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    assert "dataset" not in spec["data"] and spec["data"]["files"] == [{"path": "data/train.jsonl"}], text
    assert "dataset_name" in _commented(text)


@pytest.mark.parametrize("extra,collator,note", [
    ("    roles_to_train: [user, assistant]\n", "full", "every turn trains"),
    ("    roles_to_train: [assistant]\ntrain_on_inputs: true\n", "full", "the prompts train too"),
    ("    roles_to_train: [gpt]\n", "assistant_only", None),
])
def test_axolotl_turns_to_train_choose_the_collator(sft, project, extra, collator, note):
    config = project / "turns.yml"
    config.write_text("base_model: builtin:tiny-gemma\ndatasets:\n  - path: data/train.jsonl\n    ds_type: json\n"
                      "    type: chat_template\n" + extra, encoding="utf-8")
    result = sft("import", "axolotl", config)
    assert result.code == 0, result.out + result.err
    text = (project / "turns.sft.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text)["format"]["collator"] == collator, text
    assert note is None or note in text, text
    assert "roles_to_train" not in _commented(text) and "train_on_inputs" not in _commented(text), text


def test_an_old_field_name_beside_its_new_one_keeps_the_new_one(sft, project):
    config = project / "both_names.yml"
    config.write_text("base_model: builtin:tiny-gemma\ndatasets:\n  - path: data/train.jsonl\n    ds_type: json\n"
                      "gradient_checkpointing: true\nactivation_checkpointing: false\n", encoding="utf-8")
    result = sft("import", "axolotl", config)
    assert result.code == 0, result.out + result.err
    text = (project / "both_names.sft.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text)["training"]["activation_checkpointing"] is False, text
    assert "gradient_checkpointing" in _commented(text), text
