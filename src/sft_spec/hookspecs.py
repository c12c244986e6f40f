"""Hook specifications, grouped as the run flows (docs/hooks.md has each with an example).

collect -> validate -> load -> format -> generate before -> mask -> train -> generate after -> after
training -> check -> make report -> persist -> log; no phase reaches back. Implementations may take
fewer arguments than their spec; built-ins are mostly ``trylast``, so a user's plugin answers first
(the built-in data and format checks of ``sft_spec_validate_spec`` are ``tryfirst``: later ones see a whole item).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from .config import Config
    from .reports import ExpectationReport, SpecReport
    from .session import Session
    from .state import (
        Answer,
        Case,
        ChatMarkers,
        Conversation,
        FormattedText,
        LoadedModel,
        MaskedExample,
        SpecItem,
        SpecRun,
        When,
    )

hookspec = pluggy.HookspecMarker("sft_spec")


# -- initialisation --
@hookspec
def sft_spec_addoption(parser: argparse.ArgumentParser) -> None:
    """Add command-line options to ``sft-spec run`` (e.g. ``--html``). Called once at start-up."""


@hookspec
def sft_spec_configure(config: Config) -> None:
    """Options are parsed: reporters register here when enabled, on the main process (``config.role``)."""


@hookspec
def sft_spec_unconfigure(config: Config) -> None:
    """Called once before the process exits, also after an interrupted or crashed run."""


@hookspec
def sft_spec_register_commands(register) -> None:
    """Add subcommands: ``register(name, help, add_arguments(parser), run(options, pluginmanager) -> int)``."""


@hookspec
def sft_spec_register_formatters(register) -> None:
    """Register formatters: ``register(name, formatter, description="")`` (docs/hooks.md: the protocol)."""


@hookspec
def sft_spec_register_collators(register) -> None:
    """Register collators (loss masks): ``register(name, collator, description="")``; ``collator.spans(...)``."""


@hookspec
def sft_spec_register_model_loaders(register) -> None:
    """Register model loaders: ``register(name, loader, description="")``: ``claims``, ``validate``, ``load``."""


@hookspec
def sft_spec_register_checks(register) -> None:
    """Register checks usable in ``expect`` entries or under ``checks:``: ``register(Check(...))``."""


@hookspec
def sft_spec_register_spec_sections(register) -> None:
    """Register top-level spec keys a plugin owns: ``register(SpecSection(...))``; ``item.section(SECTION)``."""


# -- collection --
@hookspec(firstresult=True)
def sft_spec_collect_file(path: Path, session: Session) -> list[SpecItem] | None:
    """One file's spec items (one per matrix entry), or None; a broken file raises ``SpecError``."""


@hookspec
def sft_spec_resolve_spec(item: SpecItem, config: Config) -> list[Any] | None:
    """Fill each item from what its spec names while its file loads (training conversations, the chat
    template, eval sets' rows as test cases) and normalise the plugin's own keys; return problems. Every
    implementation runs before any ``sft_spec_validate_spec``, so the checks see the item whole."""


@hookspec
def sft_spec_validate_spec(item: SpecItem, config: Config) -> list[Any] | None:
    """Check each item, complete, while its file loads; return problems (``SpecError``s). Change nothing
    another plugin owns: filling and normalising is ``sft_spec_resolve_spec``'s."""


@hookspec(firstresult=True)
def sft_spec_load_data(source: Any, item: SpecItem, config: Config) -> list[Conversation] | None:
    """One ``data.files`` entry as conversations (paths inside ``item.folder``), or None if not yours."""


@hookspec
def sft_spec_collection_modifyitems(session: Session, items: list[SpecItem]) -> None:
    """Filter or reorder the collected items in place (``-k`` and ``-m`` are implemented here)."""


@hookspec
def sft_spec_collection_finish(session: Session) -> None:
    """Collected and selected (``session.items``, ``session.collect_errors``); ``--co`` lists them here."""


# -- running --
@hookspec
def sft_spec_session_start(session: Session) -> None:
    """Called after collection, before the first spec runs."""


@hookspec(firstresult=True)
def sft_spec_runtestloop(session: Session) -> bool | None:
    """Run every item (reuse_report, then run_spec here or elsewhere) and ``session.log_report`` each."""


@hookspec
def sft_spec_cache_key(item: SpecItem, config: Config) -> dict[str, Any] | None:
    """What of this plugin decides a spec's result beyond the spec itself, its conversations and the
    code: its options (``--device``), the contents of files it reads, a model's identity, as JSON-able
    values under names of its own. The result cache hashes every plugin's answer: a result is reused only
    when every input is unchanged."""


@hookspec(firstresult=True)
def sft_spec_reuse_report(item: SpecItem, session: Session) -> SpecReport | None:
    """A report for ``item`` without running it (a result-cache hit), on the main process, or None."""


@hookspec(firstresult=True)
def sft_spec_run_spec(item: SpecItem, session: Session) -> SpecReport | None:
    """Run one spec from model load to its report (the protocol; wrap it to time or guard a spec)."""


@hookspec(firstresult=True)
def sft_spec_load_model(item: SpecItem, config: Config) -> LoadedModel | None:
    """Load the model and tokenizer for a spec. Stops at the first non-None result."""


@hookspec(firstresult=True)
def sft_spec_chat_markers(item: SpecItem, run: SpecRun) -> ChatMarkers | None:
    """The spec's response template and end-of-turn marker, once after load (``run.markers``)."""


@hookspec(firstresult=True)
def sft_spec_format(item: SpecItem, run: SpecRun, messages: list[dict], add_generation_prompt: bool
                    ) -> FormattedText | None:
    """Render one conversation (or a prompt, with ``add_generation_prompt``) as text."""


@hookspec(firstresult=True)
def sft_spec_generate(item: SpecItem, run: SpecRun, prompts: list[FormattedText], when: When
                      ) -> list[Answer] | None:
    """One ``Answer`` per formatted prompt; ``when``: ``"before"`` (the base model), ``"during"`` (a probe
    while ``run.model`` trains: draw no random numbers of your own) or ``"after"`` training."""


@hookspec
def sft_spec_evaluate(item: SpecItem, run: SpecRun) -> None:
    """Measure the base model, once, before training; keep the results in ``run.stash`` for the checks."""


@hookspec(firstresult=True)
def sft_spec_make_examples(item: SpecItem, run: SpecRun) -> list[MaskedExample] | Any | None:
    """Every training example, formatted and masked (``run.formatted`` holds the first conversation's
    text). The built-in formats and masks each conversation through ``sft_spec_format`` and
    ``sft_spec_make_mask``, or, for large data that only the built-in hooks format and mask, in batches
    into a cached ``datasets.Dataset`` with ``input_ids`` and ``labels``."""


@hookspec(firstresult=True)
def sft_spec_make_mask(item: SpecItem, run: SpecRun, formatted: FormattedText, index: int
                       ) -> MaskedExample | None:
    """Tokenize formatted conversation ``index`` and decide which tokens carry the loss."""


@hookspec(firstresult=True)
def sft_spec_answer_budget(item: SpecItem, run: SpecRun, checks: list[tuple[str, Any]]) -> int | None:
    """``max_new_tokens`` for the answer these checks judge; None: the generation settings' own. The
    built-in derives it from the longest reference when ``generation.max_new_tokens`` is not set."""


@hookspec(firstresult=True)
def sft_spec_make_trainer(item: SpecItem, run: SpecRun, examples: list[MaskedExample]) -> Any:
    """Build the trainer (TRL's ``SFTTrainer`` by default) for a spec."""


@hookspec(firstresult=True)
def sft_spec_train(item: SpecItem, run: SpecRun, trainer: Any) -> list[float] | None:
    """Train; return the loss per logged step."""


@hookspec
def sft_spec_after_training(item: SpecItem, run: SpecRun) -> None:
    """The trained model has answered and still holds its adapter: save or probe it, before the checks."""


@hookspec(firstresult=True)
def sft_spec_check(item: SpecItem, run: SpecRun, case: Case, answer: Answer | None, base_answer: Answer | None
                   ) -> ExpectationReport | None:
    """A case's report, final when returned: an expectation's checks on its answers, or a training check's."""


@hookspec(firstresult=True)
def sft_spec_make_report(item: SpecItem, run: SpecRun, report: SpecReport) -> SpecReport | None:
    """Decide the outcome (a spec-level xfail) of a spec that ran, and add what the main process needs."""


# -- reporting --
@hookspec
def sft_spec_persist_report(report: SpecReport, session: Session) -> None:
    """On the main process, before logging: write what the report records (snapshots, baselines)."""


@hookspec
def sft_spec_log_report(report: SpecReport, session: Session) -> None:
    """A spec finished (or failed to load): reporters record and print it. Reports are final here."""


@hookspec
def sft_spec_run_progress(item: SpecItem, phase: str, step: int, total: int, loss: float | None) -> None:
    """Progress inside a spec: ``phase`` is load, train, generate...; training reports each step."""


@hookspec
def sft_spec_session_finish(session: Session, exitstatus: int) -> None:
    """Called after all specs ran (or the run was interrupted): reporters write their files here."""


@hookspec
def sft_spec_terminal_summary(session: Session, write_line) -> None:
    """Add lines to the end of the terminal summary (e.g. the paths of reports written)."""
