"""Training with TRL's SFTTrainer: full fine-tune, LoRA (peft) or QLoRA (bitsandbytes 4-bit).

The spec's ``training`` keys go to ``SFTConfig`` as written. sft-spec sets only what a harness must
(its own output folder, no hub, no checkpoints, a loss per step) and what the device needs, and every
change to what the user asked for is written down as a note in the reports.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import SpecError, UsageError
from sft_spec.loading.paths import check_inside
from sft_spec.state import StashKey

from ..common.files import OutsideWrite, check_written, spec_output_dir
from ..model.device import (
    BITSANDBYTES_OPTIMIZERS,
    PAGED_TO_UNPAGED,
    POLICIES,
    bitsandbytes_problem,
    cpu_has_native_bf16,
    unsupported,
)
from . import recipe_policy
from .formatters import FORMAT

#: Our defaults where TRL's differ from what the reference recipe (transformers' TrainingArguments) used.
HARNESS_DEFAULTS: dict[str, Any] = {
    # SFTConfig turns it on; TrainingArguments leaves it off. Off is what the reference recipe ran with,
    # and it is about 1.8x faster for the small models specs use (measured: 17.5 s vs 31.7 s).
    "gradient_checkpointing": False,
    "logging_steps": 1,  # one loss per step: the loss curve and loss checks need it
    "seed": 42,
}
#: Settings a harness run always uses (recipe_policy.py says why for each).
FORCED: dict[str, Any] = {
    "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "push_to_hub": False, "do_train": True,
    "eval_strategy": "no", "do_eval": False, "do_predict": False, "load_best_model_at_end": False,
    # transformers hides NaN/inf losses from the logs by default; a harness must see them to stop the spec.
    "logging_nan_inf_filter": False,
}

#: The losses the trainer's callback records while it trains.
LOSSES = StashKey[list[float]]()


@hookimpl
def sft_spec_configure(config) -> None:
    """``--output-dir`` is where the trainer writes: checked as every folder sft-spec writes into is."""
    chosen = getattr(config.options, "output_dir", None)
    if chosen:
        try:
            check_written(Path(chosen), Path.cwd())
        except OutsideWrite as exc:
            raise UsageError(f"--output-dir: {exc}") from None


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--allow-network-loggers", action="store_true",
                        help="let specs log to services over the network (training.report_to: wandb, mlflow, ...); "
                        "tensorboard writes local files and needs no permission")
    parser.add_argument(
        "--on-unsupported", choices=POLICIES, default="fallback",
        help="a setting this machine cannot run (a --device that is not there, fp16 or emulated bf16 on a CPU, "
             "4-bit qlora or 8-bit/paged optimizers without a bitsandbytes backend): fall back to the nearest "
             "setting that works and say so in every report (default), skip the spec, or fail it",
    )


def sft_config_kwargs(item, run, device: str) -> dict[str, Any]:
    """The SFTConfig arguments for this spec on this device, with notes for every change."""
    import torch
    from trl import SFTConfig

    # What TRL gets as written: fields sft-spec honours itself (the tokenizer's settings, the loss flags,
    # report_to) or manages are left out; recipe_policy.py classifies every field.
    user = {k: v for k, v in item.spec.training.items() if recipe_policy.kind("training", k) in ("passed", "path")}
    for key in ("max_length", "truncation_mode"):  # the mask phase truncated already; TRL's then keeps all
        if key in item.spec.training:
            user[key] = item.spec.training[key]
    for key, value in user.items():
        if recipe_policy.kind("training", key) == "path" and isinstance(value, str):
            user[key] = str(check_inside(item.folder, value, f"training.{key}"))
    defaults = dict(HARNESS_DEFAULTS)
    if "activation_checkpointing" in SFTConfig.__dataclass_fields__:
        # transformers 5 renamed it; the old name still works but warns.
        defaults["activation_checkpointing"] = defaults.pop("gradient_checkpointing")
    if {"gradient_checkpointing", "activation_checkpointing"} & set(user):
        defaults.pop("gradient_checkpointing", None)
        defaults.pop("activation_checkpointing", None)
    kwargs = {**defaults, **user, **FORCED}
    kwargs["output_dir"] = str(spec_output_dir(run.config, item))
    config = run.config
    loggers = item.spec.training.get("report_to", "none")
    loggers = [loggers] if isinstance(loggers, str) else list(loggers or [])
    remote = [name for name in loggers if name not in recipe_policy.LOCAL_LOGGERS]
    if remote:  # validation refused these without --allow-network-loggers
        kwargs["report_to"] = remote
    if device == "cpu":
        kwargs["use_cpu"] = True
        if user.get("fp16"):
            run.note(unsupported(config, "fp16 needs a GPU", "fp32"))
            kwargs["fp16"] = False
        if user.get("tf32"):
            run.note(unsupported(config, "tf32 needs an NVIDIA Ampere (or newer) GPU", "fp32 matmuls"))
            kwargs["tf32"] = False
        if user.get("bf16"):
            if not cpu_has_native_bf16():
                # Without AVX-512 BF16/AMX, bf16 matmuls are emulated: measured 4x slower than fp32 here.
                run.note(unsupported(config, "bf16 is emulated on this CPU (no native bf16 support)", "fp32"))
                kwargs["bf16"] = False
        elif "bf16" not in user:
            kwargs["bf16"] = False  # TRL defaults bf16 on, which it then refuses on a CPU
    elif device == "cuda":
        if user.get("bf16", "bf16" not in user and not user.get("fp16")) and not torch.cuda.is_bf16_supported():
            run.note(unsupported(config, "bf16 is not supported by this GPU", "fp16"))
            kwargs.update(bf16=False, fp16=True)
    elif device == "mps":
        kwargs.setdefault("bf16", False)
    optim = str(kwargs.get("optim", ""))
    if optim in BITSANDBYTES_OPTIMIZERS:
        problem = bitsandbytes_problem()
        if problem:
            run.note(unsupported(config, f"optim={optim} needs bitsandbytes ({problem})", "adamw_torch"))
            kwargs["optim"] = optim = "adamw_torch"
    if optim in PAGED_TO_UNPAGED and device != "cuda":
        # bitsandbytes would run it unpaged with only a warning on stderr; the reports should say so.
        nearest = PAGED_TO_UNPAGED[optim]
        run.note(unsupported(config, f"optim={optim} pages optimizer state through CUDA memory, and this run is "
                                     f"on {device}", nearest))
        kwargs["optim"] = nearest
    wants_checkpointing = kwargs.get("activation_checkpointing", kwargs.get("gradient_checkpointing"))
    if wants_checkpointing and not getattr(run.model, "supports_gradient_checkpointing", True):
        name = "activation_checkpointing" if "activation_checkpointing" in kwargs else "gradient_checkpointing"
        run.note(unsupported(config, f"{name}: {type(run.model).__name__} does not support gradient "
                                     "checkpointing", f"{name}=False"))
        kwargs[name] = False
    return kwargs


def _make_callback(item, hook, losses: list[float]):
    from transformers import TrainerCallback

    class _Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            loss = float(logs["loss"])
            if math.isnan(loss) or math.isinf(loss):
                raise FloatingPointError(f"the loss became {loss} at step {state.global_step}")
            losses.append(loss)
            hook.sft_spec_run_progress(item=item, phase="train", step=state.global_step, total=state.max_steps,
                                       loss=loss)

    return _Recorder()


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")


def _hook_ids(base) -> dict[int, tuple[set, ...]]:
    return {id(m): tuple(set(getattr(m, attr, {}) or {}) for attr in _HOOKS) for m in base.modules()}


def _undo_checkpointing(base, hooks_before: dict[int, tuple[set, ...]]) -> None:
    """Activation checkpointing, and the hooks that feed it (peft's and the Trainer's input-gradient hook on
    the embeddings), are switched on in the base model: give it back as it came, as the next spec sharing
    it expects it."""
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    for module in base.modules():
        before = hooks_before.get(id(module))
        for attr, kept in zip(_HOOKS, before or ((),) * len(_HOOKS), strict=True):
            hooks = getattr(module, attr, None)
            for key in [k for k in (hooks or {}) if k not in kept]:
                del hooks[key]


def _stop_on_nan(trainer) -> None:
    """Every step's loss is checked, whatever logging_steps or logging_strategy say: a NaN ends the spec."""
    compute_loss = trainer.compute_loss

    def checked(model, inputs, *args, **kwargs):
        result = compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        if not bool(loss.detach().isfinite().all()):
            raise FloatingPointError(f"the loss became {float(loss.detach().float().mean())} at step "
                                     f"{trainer.state.global_step + 1}")
        return result

    trainer.compute_loss = checked


def _tensorboard(item, run, trainer) -> None:
    """``report_to: tensorboard``: event files in a folder that outlives the run (the output folder when
    --output-dir is given, else .sft-spec/tensorboard under the project's root), named in the reports."""
    from transformers.integrations import TensorBoardCallback

    loggers = item.spec.training.get("report_to")
    if "tensorboard" not in ([loggers] if isinstance(loggers, str) else list(loggers or [])):
        return
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    config = run.config
    chosen = config.options.output_dir
    root = Path(chosen) if chosen else config.rootdir / ".sft-spec" / "tensorboard"
    folder = root / spec_output_dir(config, item).name / "runs"
    try:  # a committed .sft-spec symlink must not take the event files out of the project
        check_written(folder, config.rootdir if not chosen else Path.cwd())
    except OutsideWrite as exc:
        raise SpecError(f"report_to tensorboard: {exc}", item.locate("training", "report_to"),
                        key="training.report_to") from None
    trainer.add_callback(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder))))
    run.metrics["tensorboard_dir"] = str(folder)
    run.note(f"report_to tensorboard: event files in {folder} (tensorboard --logdir {root})")


def _check_target_modules(item, model) -> None:
    """Each name in ``lora.target_modules`` is a module of the model: peft silently skips a name it does not
    find as long as another one matches, and raises only when none does."""
    wanted = item.spec.lora.get("target_modules")
    if not isinstance(wanted, list):
        return  # a regular expression or "all-linear": peft resolves it
    names = [name for name, _ in model.named_modules()]
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__})
        raise SpecError(f"{', '.join(map(repr, missing))} {'is' if len(missing) == 1 else 'are'} not a module of "
                        f"{type(model).__name__}; its linear layers are {', '.join(linear)}",
                        item.locate("lora", "target_modules"), key="lora.target_modules")


def _wrap_peft(item, run, model):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    settings = {"task_type": "CAUSAL_LM", **item.spec.lora}
    if run.loaded.quantization:  # qlora, unless it fell back to an unquantized model
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        run.loaded.dirty = True  # k-bit preparation changes the base model
    _check_target_modules(item, model)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    peft_model = get_peft_model(model, LoraConfig(**settings))

    def remove_adapter() -> None:
        # Give the shared base model back as it came: without LoRA layers, and with the parameters that
        # peft froze trainable again (a full fine-tune of the same base may come next).
        base = peft_model.unload()
        for name, parameter in base.named_parameters():
            parameter.requires_grad_(trainable.get(name, True))

    run.addfinalizer(remove_adapter)
    return peft_model


def _config(sft_config, kwargs: dict, run):
    """``SFTConfig(**kwargs)``, its warnings (a setting it changed or ignores) kept as notes of this spec
    rather than printed into the terminal between its lines."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = sft_config(**kwargs)
    for warning in caught:
        run.note(f"trl.SFTConfig: {str(warning.message).strip()}")
    return args


@hookimpl(trylast=True)
def sft_spec_make_trainer(item, run, examples):
    import datasets
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    device = run.loaded.device
    hooks_before = _hook_ids(run.loaded.model)
    run.addfinalizer(lambda base=run.loaded.model: _undo_checkpointing(base, hooks_before))
    kwargs = sft_config_kwargs(item, run, device)
    set_seed(kwargs.get("seed", 42))
    model = run.model
    if item.spec.method in ("lora", "qlora"):
        model = _wrap_peft(item, run, model)
    else:
        run.loaded.dirty = True  # a full fine-tune changes the shared weights
        model.requires_grad_(True)
    run.model = model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    run.metrics.update({"trainable_parameters": trainable, "total_parameters": total})
    if isinstance(examples, datasets.Dataset):  # large data, masked in batches: Arrow on disk already
        dataset = examples.select_columns(["input_ids", "labels"])
    else:
        dataset = datasets.Dataset.from_dict({
            "input_ids": [ex.input_ids for ex in examples],
            "labels": [ex.labels for ex in examples],
        })
    try:
        args = _config(SFTConfig, kwargs, run)
    except (ValueError, ImportError) as exc:
        # A precision check of transformers' that the ones above do not foresee (e.g. on MPS).
        if not (kwargs.get("bf16") or kwargs.get("fp16")) or not re.search(r"bf16|fp16|gpu", str(exc), re.I):
            raise
        run.note(unsupported(run.config, f"the recipe's precision settings do not work on {device} ({exc})", "fp32"))
        kwargs.update(bf16=False, fp16=False)
        args = _config(SFTConfig, kwargs, run)
    if device == "cpu" and args.bf16:
        run.note("bf16 on CPU: runs with use_cpu=True (bf16 autocast)")
    run.settings = {
        "method": item.spec.method, "device": device, "model": run.loaded.source,
        "dtype": run.loaded.dtype,
        **({"quantization": run.loaded.quantization} if run.loaded.quantization else {}),
        **({"lora": {"task_type": "CAUSAL_LM", **item.spec.lora}} if item.spec.method != "full" else {}),
        "training": {k: v for k, v in kwargs.items() if k != "output_dir"},
        "format": item.section(FORMAT).model_dump(exclude={"template"}),
    }
    losses = run.stash.setdefault(LOSSES, [])
    base_config = getattr(run.loaded.model, "config", None)
    if base_config is not None and hasattr(base_config, "use_cache"):
        # transformers' Trainer sets model.config.use_cache to TrainingArguments.use_cache (False): give the
        # shared base model its own value back, as a later spec expects to find it.
        use_cache = base_config.use_cache
        run.addfinalizer(lambda: setattr(base_config, "use_cache", use_cache))
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=run.loaded.tokenizer,
        callbacks=[_make_callback(item, run.config.hook, losses)],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the terminal reporter shows progress
    _stop_on_nan(trainer)
    _tensorboard(item, run, trainer)
    return trainer


@hookimpl(trylast=True)
def sft_spec_train(item, run, trainer) -> list[float]:
    cuda = _on_cuda(run.model)
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    run.model = trainer.model
    run.model.eval()
    losses = run.stash.get(LOSSES, [])
    seconds = time.perf_counter() - start
    run.metrics["train_seconds"] = round(seconds, 3)
    run.metrics["steps"] = trainer.state.global_step
    if losses:
        run.metrics["final_loss"] = losses[-1]
    run.metrics.update(_cost(run, trainer, seconds, cuda))
    return losses


def _on_cuda(model) -> bool:
    try:
        return next(model.parameters()).device.type == "cuda"
    except (StopIteration, AttributeError):
        return False


def _cost(run, trainer, seconds: float, cuda: bool) -> dict[str, Any]:
    """What the recipe costs, for compare to name a slowdown or a memory growth: tokens trained (the
    examples' tokens times the epochs done), tokens per second, and peak memory (CUDA's max allocated on a
    GPU, else the process's peak resident memory so far)."""
    examples = run.examples
    if isinstance(examples, list):
        tokens_per_epoch = sum(len(example.input_ids) for example in examples)
    else:  # large data, a datasets.Dataset: counted in Arrow
        import pyarrow.compute as pc

        tokens_per_epoch = pc.sum(pc.list_value_length(examples.with_format("arrow")["input_ids"])).as_py() or 0
    tokens = int(tokens_per_epoch * float(trainer.state.epoch or 0))
    if cuda:
        import torch

        memory, kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
    else:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        memory, kind = peak / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"
    return {"train_tokens": tokens, "train_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "peak_memory_mb": round(memory, 1), "peak_memory_kind": kind}


@hookimpl
def sft_spec_terminal_summary(session, write_line) -> None:
    folders = [r.metrics["tensorboard_dir"] for r in session.reports if r.metrics.get("tensorboard_dir")]
    if folders:
        roots = sorted({str(Path(f).parent.parent) for f in folders})
        write_line(f"TensorBoard: {len(folders)} run{'s' if len(folders) != 1 else ''} logged: tensorboard --logdir "
                   + " ".join(roots))


@hookimpl
def sft_spec_cache_key(item, config):
    """--on-unsupported: a result that fell back (fallback) must not be reused where falling back is refused."""
    return {"on_unsupported": config.getoption("on_unsupported", "fallback") or "fallback"}
