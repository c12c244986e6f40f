"""Loss baselines: ``checks: {loss_baseline: true}`` compares the loss curve with a recorded one.

The curve lives in ``__baselines__/<spec name>.yaml`` beside the spec, keyed by spec id
(``name[variant]``), together with a fingerprint of everything that decides it: the model and its
revision, the tokenizer and chat template, the training data, the recipe's effective settings, the
library versions, the device and dtype. Each step must agree within ``atol + rtol * |recorded|`` and the
mean loss within ``mean_drift`` (relative). When the fingerprint differs the comparison means nothing:
the check fails as a *stale* baseline that names what changed ("stale baseline: trl 1.16.0 -> 1.17.0;
rerun with --update-baselines"), so an upgrade never passes or fails silently.

The check decides wherever the spec runs (under ``--update-baselines`` a recorded curve passes); the
curve and its fingerprint travel in the report (``report.extra``) and the file is written on the main
process, before the report is logged (``sft_spec_persist_report``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.registry import Check, CheckContext, CheckResult
from sft_spec.state import StashKey

from ..common import recorded as rec
from ..common.recorded import RecordedFile, recorded_path, short_id

FOLDER = "__baselines__"
HEADER = ("# Loss curves recorded by `sft-spec run --update-baselines` for `loss_baseline` checks,\n"
          "# with the fingerprint of what produced them. Keyed by spec id; review changes like code.\n")
DEFAULTS = {"rtol": 0.05, "atol": 0.01, "mean_drift": 0.05}
EXTRA = "loss_baseline"  # report.extra key: {"fingerprint": ..., "losses": [...]}
RECORDED_EXTRA = "recorded_loss_baseline"  # report.extra key: the curve the baseline file holds, for the HTML


def baseline_path(spec_path):
    return recorded_path(spec_path, FOLDER)


def _valid(value: Any) -> str | None:
    if value is True:
        return None
    if not isinstance(value, dict) or not value:
        return f"loss_baseline: expected true or a mapping of {', '.join(DEFAULTS)}, got {value!r}"
    unknown = set(value) - set(DEFAULTS)
    if unknown:
        return f"loss_baseline: unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(DEFAULTS)})"
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float) or number < 0:
            return f"loss_baseline.{key}: expected a number >= 0, got {number!r}"
    return None


def tolerances(argument: Any) -> dict[str, float]:
    return {**DEFAULTS, **(argument if isinstance(argument, dict) else {})}


def compare_curves(losses: list[float], recorded: list[float], tol: dict[str, float]) -> tuple[bool, str]:
    """Step by step within atol + rtol*|recorded|, and the mean within mean_drift (relative)."""
    if len(losses) != len(recorded):
        return False, f"{len(losses)} logged steps, the baseline has {len(recorded)}"
    if not losses:
        return False, "no loss was logged"
    bad = [(i, new, old) for i, (new, old) in enumerate(zip(losses, recorded, strict=True))
           if not abs(new - old) <= tol["atol"] + tol["rtol"] * abs(old)]  # NaN fails too
    mean_new, mean_old = sum(losses) / len(losses), sum(recorded) / len(recorded)
    drift = abs(mean_new - mean_old) / max(abs(mean_old), 1e-12)
    problems = []
    if bad:
        shown = ", ".join(f"step {i + 1}: {old:.4g} -> {new:.4g}" for i, new, old in bad[:3])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        problems.append(f"{len(bad)} of {len(losses)} steps outside rtol={tol['rtol']}, atol={tol['atol']}: "
                        f"{shown}{more}")
    if math.isnan(drift) or drift > tol["mean_drift"]:
        problems.append(f"mean loss {mean_old:.4g} -> {mean_new:.4g} (drift {drift:.1%} > {tol['mean_drift']:.0%})")
    if problems:
        return False, "; ".join(problems)
    return True, f"{len(losses)} steps within tolerance, mean drift {drift:.2%}"


def loss_baseline(_: str, argument: Any, ctx: CheckContext) -> CheckResult:
    path = baseline_path(ctx.item.path)
    recorded = RecordedFile(path, HEADER)
    entry = recorded.entries.get(short_id(ctx.item.nodeid))
    if isinstance(entry, dict) and isinstance(entry.get("losses"), list):
        ctx.run.stash[RECORDED] = [float(x) for x in entry["losses"]]  # drawn under this run's curve
    current = {"fingerprint": _plain(fingerprint(ctx.item, ctx.run)), "losses": [float(x) for x in ctx.losses]}
    ctx.run.stash[CURRENT] = current
    if ctx.config.getoption("update_baselines"):
        if entry == current:
            return CheckResult(True, f"baseline unchanged: {len(ctx.losses)} steps")
        return CheckResult(True, f"baseline {'updated' if entry else 'recorded'}: {len(ctx.losses)} steps")
    if recorded.error:
        return CheckResult(False, f"{recorded.error}; rewrite it with --update-baselines")
    if isinstance(entry, dict) and isinstance(entry.get("fingerprint"), dict):
        changes = fingerprint_changes(entry["fingerprint"], current["fingerprint"])
        if changes:
            return CheckResult(False, f"stale baseline: {', '.join(changes)}; rerun with --update-baselines")
    if not isinstance(entry, dict) or not isinstance(entry.get("losses"), list):
        return CheckResult(False, f"no loss baseline recorded for {short_id(ctx.item.nodeid)} in {path}; "
                           "record it with --update-baselines")
    ok, message = compare_curves(ctx.losses, [float(x) for x in entry["losses"]], tolerances(argument))
    return CheckResult(ok, message)


@hookimpl
def sft_spec_register_checks(register) -> None:
    register(Check("loss_baseline", loss_baseline, "true or {rtol, atol, mean_drift}: the loss curve matches the "
                   "one recorded in __baselines__/ (record with --update-baselines)", _valid, scope="training"))


@hookimpl
def sft_spec_addoption(parser) -> None:
    parser.add_argument("--update-baselines", action="store_true", dest="update_baselines",
                        help="record the loss curves (and fingerprints) of `loss_baseline` checks")


# -- fingerprint ---------------------------------------------------------------------------------------


def _model_revision(item) -> str | None:
    model = item.spec.model
    if model.id.startswith("builtin:"):
        from ..model.builtin_models import BUILD_VERSION

        return f"builtin build {BUILD_VERSION}"
    return model.revision


TOKENIZER_HASH = StashKey[str]()
#: This spec's curve and fingerprint, as the check computed them, for the report.
CURRENT = StashKey[dict]()
RECORDED = StashKey[list]()  # the recorded curve, to draw under this run's


def tokenizer_hash(loaded) -> str:
    cached = loaded.stash.get(TOKENIZER_HASH, None)
    if cached:
        return cached
    tokenizer = loaded.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body: Any = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    digest = rec.sha256([body, tokenizer.all_special_tokens])[:16]
    loaded.stash[TOKENIZER_HASH] = digest
    return digest


def fingerprint(item, run) -> dict[str, Any]:
    loaded = run.loaded
    from ..train.trainer import FORCED

    settings = {k: v for k, v in run.settings.items() if k not in ("model", "generation", "device", "dtype")}
    # What every harness run forces (save_strategy: no, ...) says nothing about this recipe's curve.
    training = {k: v for k, v in settings.get("training", {}).items() if k not in FORCED or FORCED[k] != v}
    settings = {**settings, "training": training} if "training" in settings else settings
    template = item.chat_template or getattr(loaded.tokenizer, "chat_template", None) or ""
    return {
        "model": item.spec.model.id,
        "model_revision": _model_revision(item),
        "tokenizer": tokenizer_hash(loaded),
        "chat_template": rec.sha256(template)[:16],
        "data": rec.sha256(item.conversations)[:16],
        "settings": settings,
        "versions": {**rec.library_versions(), **_bitsandbytes_version(run.settings)},
        "device": run.settings.get("device", loaded.device),
        "dtype": run.settings.get("dtype", loaded.dtype),
    }


def _bitsandbytes_version(settings: dict[str, Any]) -> dict[str, str]:
    """Its version, for a recipe whose curve depends on it (an 8-bit optimizer, 4-bit layers) only."""
    from ..model.device import BITSANDBYTES_OPTIMIZERS

    if settings.get("quantization") or str(settings.get("training", {}).get("optim")) in BITSANDBYTES_OPTIMIZERS:
        return {"bitsandbytes": rec.optional_version("bitsandbytes")}
    return {}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """``["trl 1.16.0 -> 1.17.0", "training.learning_rate 0.01 -> 0.02"]``."""
    flat_old, flat_new = rec.flatten(old), rec.flatten(new)
    changes = []
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key, "(unset)"), flat_new.get(key, "(unset)")
        if before != after:
            shown = key.split(".", 1)[1] if key.startswith(("versions.", "settings.")) else key
            changes.append(f"{shown} {before} -> {after}")
    return changes


# -- on the main process ------------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.files: dict[Any, RecordedFile] = {}
        self.added: list[str] = []
        self.changed: list[str] = []
        self.stale: list[str] = []

    def file(self, spec_path) -> RecordedFile:
        path = baseline_path(spec_path)
        if path not in self.files:
            self.files[path] = RecordedFile(path, HEADER)
        return self.files[path]


STATE = StashKey[_State]()


@hookimpl(wrapper=True)
def sft_spec_make_report(item, run, report):
    report = yield
    current = run.stash.get(CURRENT, None)
    if current is not None:
        report.extra[EXTRA] = current  # what --update-baselines writes, on the main process
    if run.stash.get(RECORDED, None) is not None:
        report.extra[RECORDED_EXTRA] = run.stash[RECORDED]
    return report


@hookimpl
def sft_spec_persist_report(report, session) -> None:
    current = report.extra.get(EXTRA)
    if current is None or not report.path:
        return
    state = session.config.stash.setdefault(STATE, _State())
    if any(c.name == "loss_baseline" and "stale baseline" in c.message for case in report.training_checks
           for c in case.checks):
        state.stale.append(report.nodeid)
    if not session.config.getoption("update_baselines"):
        return
    recorded = state.file(Path(report.path))
    key = short_id(report.nodeid)
    old = recorded.entries.get(key)
    if old != current:
        recorded.set(key, current)
        recorded.save()
        (state.changed if old else state.added).append(report.nodeid)


def _plain(value: Any) -> Any:
    """Settings as YAML-safe plain values (enums and paths as strings), as they read back from the file."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@hookimpl
def sft_spec_terminal_summary(session, write_line) -> None:
    state = session.config.stash.get(STATE, None)
    if state is None:
        return
    if state.added:
        write_line(f"loss baselines: {len(state.added)} recorded: {', '.join(state.added)}")
    if state.changed:
        write_line(f"loss baselines: {len(state.changed)} updated: {', '.join(state.changed)}")
    if state.stale:
        write_line(f"loss baselines: {len(state.stale)} stale (rerun with --update-baselines): "
                   f"{', '.join(state.stale)}")


@hookimpl
def sft_spec_cache_key(item, config):
    return {"baselines": rec.recorded_hash(item.path, "__baselines__")}
