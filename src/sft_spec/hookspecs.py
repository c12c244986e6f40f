"""Hook specifications: every phase of a run is a hook, grouped as the run flows.

collect -> validate -> load model -> format -> mask -> train -> generate -> check -> report.
An implementation may accept fewer arguments than its spec, so specs can grow without breaking plugins.
Built-in implementations are ``trylast``: a user's plugin that answers first wins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from .config import Config
    from .loader import Expectation, SpecItem
    from .registry import FormattedText, MaskedExample
    from .reports import ExpectationReport, SpecReport
    from .runner import LoadedModel, SpecRun
    from .session import Session

hookspec = pluggy.HookspecMarker("sft_spec")


# -- initialisation ----------------------------------------------------------------------------------


@hookspec
def sft_spec_addoption(parser: argparse.ArgumentParser) -> None:
    """Add command-line options to ``sft-spec run`` (e.g. ``--html``). Called once at start-up."""


@hookspec
def sft_spec_configure(config: Config) -> None:
    """Called after options are parsed; reporters register themselves here only when enabled."""


@hookspec
def sft_spec_unconfigure(config: Config) -> None:
    """Called once before the process exits, also after an interrupted or crashed run."""


@hookspec
def sft_spec_register_commands(register) -> None:
    """Add ``sft-spec`` subcommands: ``register(name, help, add_arguments, run)``.

    ``add_arguments(parser)`` declares its options; ``run(options, pluginmanager) -> int`` returns the
    exit code. Called before the command line is parsed.
    """


@hookspec
def sft_spec_register_formatters(register) -> None:
    """Register formatters: ``register(name, formatter, description="")``.

    A formatter has ``format(messages, tokenizer, fmt, *, add_generation_prompt=False, template=None)``
    returning :class:`sft_spec.registry.FormattedText`.
    """


@hookspec
def sft_spec_register_collators(register) -> None:
    """Register collators (loss masks): ``register(name, collator, description="")``.

    A collator has ``mask(formatted, tokenizer, fmt, *, markers)`` (``markers``: the template's
    ``response_template`` and ``end_of_turn``, derived from the chat template) returning
    :class:`sft_spec.registry.MaskedExample`, and optionally ``validate(fmt) -> str | None``.
    """


@hookspec
def sft_spec_register_model_loaders(register) -> None:
    """Register model loaders: ``register(name, loader, description="")``.

    A loader has ``claims(model_spec) -> bool``, ``validate(model_spec) -> str | None`` (cheap, no
    torch) and ``load(model_spec, config, *, quantization=None) -> LoadedModel``.
    """


@hookspec
def sft_spec_register_checks(register) -> None:
    """Register checks usable in ``expect`` entries or under ``checks:``: ``register(Check(...))``."""


# -- collection --------------------------------------------------------------------------------------


@hookspec
def sft_spec_collect_file(path: Path, session: Session) -> list[SpecItem] | None:
    """Turn one file into spec items (one per matrix entry); ``None`` when the file is not a spec.

    Broken files raise :class:`sft_spec.errors.SpecError`; the session reports them and goes on.
    """


@hookspec
def sft_spec_validate_spec(item: SpecItem, session: Session) -> list[str] | None:
    """Extra validation of a loaded spec; return messages for problems (each becomes a spec error)."""


@hookspec
def sft_spec_collection_modifyitems(session: Session, items: list[SpecItem]) -> None:
    """Filter or reorder the collected items in place (``-k`` and ``-m`` are implemented here)."""


# -- running -----------------------------------------------------------------------------------------


@hookspec
def sft_spec_session_start(session: Session) -> None:
    """Called after collection, before the first spec runs."""


@hookspec(firstresult=True)
def sft_spec_load_model(item: SpecItem, config: Config) -> LoadedModel | None:
    """Load the model and tokenizer for a spec. Stops at the first non-None result."""


@hookspec(firstresult=True)
def sft_spec_format(
    item: SpecItem, run: SpecRun, messages: list[dict], add_generation_prompt: bool
) -> FormattedText | None:
    """Render one conversation (or a prompt, with ``add_generation_prompt``) as text."""


@hookspec(firstresult=True)
def sft_spec_make_mask(item: SpecItem, run: SpecRun, formatted: FormattedText) -> MaskedExample | None:
    """Tokenize a formatted conversation and decide which tokens carry the loss."""


@hookspec(firstresult=True)
def sft_spec_make_trainer(item: SpecItem, run: SpecRun, examples: list[MaskedExample]) -> Any:
    """Build the trainer (TRL's ``SFTTrainer`` by default) for a spec."""


@hookspec(firstresult=True)
def sft_spec_train(item: SpecItem, run: SpecRun, trainer: Any) -> list[float] | None:
    """Train; return the loss per logged step."""


@hookspec(firstresult=True)
def sft_spec_generate(item: SpecItem, run: SpecRun, prompts: list[list[dict]]) -> list[dict] | None:
    """Greedy-generate one answer per prompt: ``[{"text": cleaned, "raw": with special tokens}]``."""


@hookspec(firstresult=True)
def sft_spec_check(
    item: SpecItem, run: SpecRun, expectation: Expectation, answer: dict, base_answer: dict | None
) -> ExpectationReport | None:
    """Apply an expectation's checks to an answer (``{"text", "raw"}``, as ``sft_spec_generate`` gives)
    and to the base model's answer (for ``before`` checks), and return its report."""


@hookspec(firstresult=True)
def sft_spec_make_report(item: SpecItem, run: SpecRun, report: SpecReport) -> SpecReport | None:
    """Complete a spec's report once its phases ran: decide its outcome (xfail included), add metrics.

    Not called for specs that were skipped, broken or interrupted. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def sft_spec_run_spec(item: SpecItem, session: Session) -> SpecReport | None:
    """Run one spec from model load to its report (the protocol; wrap it to time or guard a spec)."""


# -- reporting ---------------------------------------------------------------------------------------


@hookspec
def sft_spec_log_report(report: SpecReport, session: Session) -> None:
    """A spec finished (or failed to load): reporters record and print it."""


@hookspec
def sft_spec_run_progress(item: SpecItem, phase: str, step: int, total: int, loss: float | None) -> None:
    """Progress inside a spec: ``phase`` is load, train, generate...; training reports each step."""


@hookspec
def sft_spec_session_finish(session: Session, exitstatus: int) -> None:
    """Called after all specs ran (or the run was interrupted): reporters write their files here."""


@hookspec
def sft_spec_terminal_summary(session: Session, write_line) -> None:
    """Add lines to the end of the terminal summary (e.g. the paths of reports written)."""
