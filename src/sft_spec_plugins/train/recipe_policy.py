"""Every field of ``trl.SFTConfig`` and ``peft.LoraConfig``, classified once: what sft-spec does with it.

- ``passed``: given to TRL / peft as the spec wrote it (device fallbacks aside, each with a note).
- ``path``: passed, after the path rule: a file inside the spec's folder (``deepspeed: ds.json``).
- ``sft-spec``: honoured by sft-spec's own phases, which TRL would otherwise skip or apply too late (the
  loss mask, truncation, the tokenizer's special tokens and template, where logs go).
- ``managed``: sft-spec uses its own value; a spec that sets another gets a note in every report
  saying what was used instead.
- ``refused``: an error located at the key, saying why.

``tests/train/test_recipe_policy.py`` fails when the installed TRL or peft has a field this table does not
classify, so an upgrade is classified on purpose; the spec reference is generated from this table.
"""

from __future__ import annotations

#: (kind, why or how) per field; kinds as in the module docstring.
Policy = tuple[str, str]

_PUBLISH = "a spec may not publish models or runs"
_NO_EVAL = "a spec has no evaluation dataset: evaluation does not run (the spec's checks run after training)"
_NO_CHECKPOINTS = ("sft-spec saves no checkpoints (save_strategy 'no'); the adapter round trip and the result "
                   "cache save the adapter")
_PASSED = ("per_device_train_batch_size num_train_epochs max_steps learning_rate lr_scheduler_type lr_scheduler_kwargs "
           "warmup_steps optim optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon optim_target_modules "
           "gradient_accumulation_steps average_tokens_across_devices max_grad_norm label_smoothing_factor bf16 fp16 "
           "tf32 activation_checkpointing activation_checkpointing_kwargs gradient_checkpointing "
           "gradient_checkpointing_kwargs torch_compile torch_compile_backend torch_compile_mode use_liger_kernel "
           "liger_kernel_config use_cache neftune_noise_alpha torch_empty_cache_steps auto_find_batch_size "
           "logging_strategy logging_steps logging_first_step log_on_each_node include_num_input_tokens_seen "
           "log_level log_level_replica run_name project full_determinism seed data_seed parallelism_config "
           "dataloader_drop_last dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers "
           "dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order remove_unused_columns "
           "label_names train_sampling_strategy length_column_name ddp_find_unused_parameters ddp_bucket_cap_mb "
           "ddp_broadcast_buffers ddp_static_graph ddp_backend ddp_timeout fsdp debug skip_memory_metrics "
           "router_aux_loss_coef dataset_kwargs dataset_num_proc shuffle_dataset packing packing_strategy "
           "padding_free pad_to_multiple_of loss_type activation_offloading").split()

TRAINING: dict[str, Policy] = {
    **{name: ("passed", "") for name in _PASSED},
    **{name: ("path", "a config file inside the spec's folder (or an inline mapping)")
       for name in ("deepspeed", "fsdp_config", "accelerator_config")},
    "max_length": ("sft-spec", "the mask phase truncates each training text to it (default 1024)"),
    "truncation_mode": ("sft-spec", "the mask phase keeps the start (keep_start) or the end (keep_end)"),
    "eos_token": ("sft-spec", "set on this spec's own copy of the tokenizer at load, before formatting"),
    "pad_token": ("sft-spec", "set on this spec's own copy of the tokenizer at load, before formatting"),
    "chat_template_path": ("sft-spec", "a template file inside the spec's folder, read at load into this spec's "
                           "own copy of the tokenizer, so formatting, masks and generation use it"),
    "completion_only_loss": ("sft-spec", "read as format.collator: true is completion_only, false is full"),
    "assistant_only_loss": ("sft-spec", "read as format.collator: true is assistant_only"),
    "report_to": ("sft-spec", "none or tensorboard (event files kept, not in the temporary output folder); "
                  "loggers that send the run over the network need --allow-network-loggers"),
    "use_cpu": ("managed", "set from --device"),
    "do_train": ("managed", "true: every spec trains"),
    "local_rank": ("managed", "set by the launcher (launcher: or --launcher)"),
    "disable_tqdm": ("managed", "true: the terminal reporter shows progress"),
    "logging_nan_inf_filter": ("managed", "false: a NaN or infinite loss must stop the spec"),
    "dataset_text_field": ("managed", "unused: sft-spec formats with format: and gives TRL input_ids and labels"),
    **{name: ("managed", _NO_CHECKPOINTS) for name in (
        "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node",
        "enable_jit_checkpoint", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
        "restore_callback_states_from_checkpoint", "ignore_data_skip")},
    **{name: ("managed", _NO_EVAL) for name in (
        "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
        "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
        "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "eval_packing", "do_eval",
        "do_predict")},
    "output_dir": ("refused", "sft-spec writes run files under its own output folder (--output-dir)"),
    "logging_dir": ("refused", "sft-spec writes run files under its own output folder (--output-dir)"),
    "resume_from_checkpoint": ("refused", "each run trains from the base model"),
    "model_init_kwargs": ("refused", "the model is loaded from model: (id, revision, dtype, trust_remote_code)"),
    "trust_remote_code": ("refused", "set model.trust_remote_code, which also needs --allow-remote-code"),
    **{name: ("refused", _PUBLISH) for name in (
        "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push",
        "hub_revision", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id")},
}

LORA: dict[str, Policy] = {
    **{name: ("passed", "") for name in (
        "r target_modules exclude_modules lora_alpha lora_dropout fan_in_fan_out bias use_rslora modules_to_save "
        "init_lora_weights layers_to_transform layers_pattern rank_pattern alpha_pattern megatron_config "
        "megatron_core trainable_token_indices loftq_config use_dora velora_config alora_invocation_tokens "
        "use_qalora qalora_group_size monteclora_config layer_replication runtime_config lora_bias "
        "target_parameters use_bdlora kasa_config ensure_weight_tying").split()},
    "task_type": ("managed", "CAUSAL_LM: sft-spec trains causal language models"),
    "peft_type": ("managed", "LORA, from method: lora or qlora"),
    "inference_mode": ("managed", "false: the adapter is trained"),
    "base_model_name_or_path": ("managed", "set by peft from the loaded model"),
    "revision": ("managed", "set by peft from the loaded model (model.revision says which)"),
    "auto_mapping": ("managed", "set by peft"),
    "peft_version": ("managed", "set by peft"),
    **{name: ("refused", "needs an initialisation pass over the training data that sft-spec does not run")
       for name in ("eva_config", "corda_config", "lora_ga_config")},
    "arrow_config": ("refused", "routes between several trained adapters; a spec trains one"),
}
#: ``init_lora_weights`` values that need such a pass (or a config above): refused the same way.
DATA_DRIVEN_INITS = ("eva", "corda", "lora_ga")

#: Loggers (report_to) that write only local files; any other sends the run over the network.
LOCAL_LOGGERS = ("none", "tensorboard")


def kind(section: str, name: str) -> str:
    table = TRAINING if section == "training" else LORA
    return table.get(name, ("passed", ""))[0]


def why(section: str, name: str) -> str:
    table = TRAINING if section == "training" else LORA
    return table.get(name, ("passed", ""))[1]
