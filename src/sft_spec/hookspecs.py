"""Hook specifications: every phase of a run is a hook, grouped as the run flows.

collect -> validate -> load model -> format -> generate before -> mask -> train -> generate after
-> after training -> check -> make report -> persist -> log. Each phase reads what earlier phases left
on the :class:`~sft_spec.state.SpecRun` and adds its own; none reaches back. An implementation may
accept fewer arguments than its spec, so specs can grow without breaking plugins. Built-in
implementations are ``trylast``: a user's plugin that answers first wins.
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
    from .spec import DataFile
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


# -- initialisation ----------------------------------------------------------------------------------


@hookspec
def sft_spec_addoption(parser: argparse.ArgumentParser) -> None:
    """Add command-line options to ``sft-spec run`` (e.g. ``--html``). Called once at start-up."""


@hookspec
def sft_spec_configure(config: Config) -> None:
    """Called after options are parsed; reporters register themselves here only when enabled (and only
    in the main process: ``config.role == "main"``)."""


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
    returning :class:`sft_spec.state.FormattedText`.
    """


@hookspec
def sft_spec_register_collators(register) -> None:
    """Register collators (loss masks): ``register(name, collator, description="")``.

    A collator has ``mask(formatted, tokenizer, fmt, *, markers)`` (``markers``: the spec's
    :class:`~sft_spec.state.ChatMarkers`) returning :class:`sft_spec.state.MaskedExample`, and optionally
    ``validate(fmt) -> str | None``.
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


@hookspec
def sft_spec_register_spec_sections(register) -> None:
    """Register top-level spec keys a plugin owns: ``register(SpecSection(name, model, description))``.

    The loader validates the key with the pydantic ``model`` (located errors, did-you-mean hints), in
    ``sft-defaults.yaml`` and matrix entries too; read it with ``item.section(SECTION)``.
    """


# -- collection --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def sft_spec_collect_file(path: Path, session: Session) -> list[SpecItem] | None:
    """Turn one file into spec items (one per matrix entry); ``None`` when the file is not a spec.

    Broken files raise :class:`sft_spec.errors.SpecError`; the session reports them and goes on.
    """


@hookspec
def sft_spec_validate_spec(item: SpecItem, config: Config) -> list[Any] | None:
    """Check one loaded spec item (each matrix entry) beyond its schema; called while its file loads.

    Return problems: a :class:`~sft_spec.errors.SpecError` located at its key (``item.locate("training",
    key)``), or a plain message (located at the spec). A plugin may normalise the item here (rename an
    old key, with a note in ``item.notes``): the item is the spec's own copy.
    """


@hookspec(firstresult=True)
def sft_spec_load_data(source: DataFile, item: SpecItem, config: Config) -> list[Conversation] | None:
    """Read one ``data.files`` entry of a spec into conversations, while its file loads.

    Paths go through :func:`sft_spec.loading.paths.check_inside` against ``item.folder``. A problem is a
    :class:`~sft_spec.errors.SpecError` located in the data file (``data/train.jsonl:17``). Return None
    for a source this plugin does not read; the built-in reader is ``trylast``.
    """


@hookspec
def sft_spec_collection_modifyitems(session: Session, items: list[SpecItem]) -> None:
    """Filter or reorder the collected items in place (``-k`` and ``-m`` are implemented here)."""


# -- running -----------------------------------------------------------------------------------------


@hookspec
def sft_spec_session_start(session: Session) -> None:
    """Called after collection, before the first spec runs."""


@hookspec(firstresult=True)
def sft_spec_runtestloop(session: Session) -> bool | None:
    """Run every collected item and log each report (``session.log_report``), in collection order.

    The built-in runs them one after another in this process; ``-n`` answers it with worker processes.
    An implementation asks :func:`sft_spec_reuse_report` first for each item (on this process), and
    runs the others through :func:`sft_spec_run_spec` (here or elsewhere). Return True when done.
    """


@hookspec(firstresult=True)
def sft_spec_reuse_report(item: SpecItem, session: Session) -> SpecReport | None:
    """A report for ``item`` without running it (a result-cache hit), or None to run it.

    Called on the main process before the item is run or sent anywhere, so a hit costs no worker time.
    """


@hookspec(firstresult=True)
def sft_spec_run_spec(item: SpecItem, session: Session) -> SpecReport | None:
    """Run one spec from model load to its report (the protocol; wrap it to time or guard a spec)."""


@hookspec(firstresult=True)
def sft_spec_load_model(item: SpecItem, config: Config) -> LoadedModel | None:
    """Load the model and tokenizer for a spec. Stops at the first non-None result."""


@hookspec(firstresult=True)
def sft_spec_chat_markers(item: SpecItem, run: SpecRun) -> ChatMarkers | None:
    """The response template and end-of-turn marker of the spec's chat format, once after load.

    Masks and generation read ``run.markers`` instead of asking the formatter again.
    """


@hookspec(firstresult=True)
def sft_spec_format(item: SpecItem, run: SpecRun, messages: list[dict], add_generation_prompt: bool
                    ) -> FormattedText | None:
    """Render one conversation (or a prompt, with ``add_generation_prompt``) as text."""


@hookspec(firstresult=True)
def sft_spec_generate(item: SpecItem, run: SpecRun, prompts: list[FormattedText], when: When
                      ) -> list[Answer] | None:
    """Greedy-generate one :class:`~sft_spec.state.Answer` per formatted prompt.

    ``when`` is ``"before"`` (the base model, for ``before:`` and ``retains`` checks) or ``"after"``
    (the trained model), so a plugin never has to guess the phase from the model's state.
    """


@hookspec(firstresult=True)
def sft_spec_make_mask(item: SpecItem, run: SpecRun, formatted: FormattedText, index: int
                       ) -> MaskedExample | None:
    """Tokenize formatted conversation ``index`` and decide which tokens carry the loss."""


@hookspec(firstresult=True)
def sft_spec_make_trainer(item: SpecItem, run: SpecRun, examples: list[MaskedExample]) -> Any:
    """Build the trainer (TRL's ``SFTTrainer`` by default) for a spec."""


@hookspec(firstresult=True)
def sft_spec_train(item: SpecItem, run: SpecRun, trainer: Any) -> list[float] | None:
    """Train; return the loss per logged step."""


@hookspec
def sft_spec_after_training(item: SpecItem, run: SpecRun) -> None:
    """The trained model has answered (``run.answers``) and still holds its adapter: save or probe it.

    Called before the checks and before the finalizers (which remove a LoRA adapter from a shared base):
    the adapter round trip and the result cache work here.
    """


@hookspec(firstresult=True)
def sft_spec_check(item: SpecItem, run: SpecRun, case: Case, answer: Answer | None, base_answer: Answer | None
                   ) -> ExpectationReport | None:
    """Apply a case's checks and return its report; its results are final when this returns.

    ``case`` is an expectation (``answer``: the trained model's, ``base_answer``: the base model's when a
    check needs it) or a training check (both None; the run's losses are on ``run``).
    """


@hookspec(firstresult=True)
def sft_spec_make_report(item: SpecItem, run: SpecRun, report: SpecReport) -> SpecReport | None:
    """Complete a spec's report once its phases ran: decide its outcome (a spec-level xfail), add metrics.

    Not called for specs that were skipped, broken or interrupted. Stops at the first non-None result.
    """


# -- reporting ---------------------------------------------------------------------------------------


@hookspec
def sft_spec_persist_report(report: SpecReport, session: Session) -> None:
    """On the main process, before a report is logged: write the files it records (snapshots, baselines).

    Wherever the spec ran (here, a worker, a cluster), files beside the specs are written here. An
    exception makes that spec an error, with the message; the other specs' files are still written.
    """


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
