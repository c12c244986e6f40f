"""Named things plugins provide: formatters, collators, model loaders and checks.

Plugins fill these through the ``sft_spec_register_*`` hooks, llm/datasette style: the host passes a
``register`` callback and the plugin calls it. Specs then pick them by name, and an unknown name is a
located error with a did-you-mean hint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass
class FormattedText:
    """A conversation rendered as the model sees it.

    ``assistant_spans`` are character ranges of each assistant turn's text including its end-of-turn
    marker: what a multi-turn loss mask trains on.
    """

    text: str
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)
    prompt_end: int = 0  # where the last assistant turn starts


@dataclass
class MaskedExample:
    """Token ids and labels (-100 where no loss) of one training conversation."""

    input_ids: list[int]
    labels: list[int]
    formatted: FormattedText
    offsets: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class CheckResult:
    passed: bool
    message: str = ""
    expected: str | None = None  # text to diff the answer against, when the check has one


@dataclass
class CheckContext:
    """What a check may look at besides the answer."""

    expectation: Any = None
    base_answer: str | None = None
    losses: list[float] = field(default_factory=list)
    item: Any = None


class Formatter(Protocol):
    def format(self, messages: list[dict], tokenizer: Any, fmt: Any, *, add_generation_prompt: bool = False,
               template: str | None = None) -> FormattedText: ...


class Collator(Protocol):
    def mask(self, formatted: FormattedText, tokenizer: Any, fmt: Any, *, end_of_turn: str | None) -> MaskedExample: ...


@dataclass
class Check:
    """A named check. ``scope='answer'`` checks a generated answer; ``'training'`` checks the run."""

    name: str
    func: Callable[[Any, Any, CheckContext], CheckResult]
    description: str = ""
    validate: Callable[[Any], str | None] | None = None
    scope: Literal["answer", "training"] = "answer"
    needs_base_answer: bool = False


@dataclass
class Named:
    """A registered formatter, collator or model loader with its plugin's name."""

    name: str
    obj: Any
    plugin: str = ""
    description: str = ""


class Registry:
    """Formatters, collators, model loaders and checks, by name."""

    def __init__(self) -> None:
        self.formatters: dict[str, Named] = {}
        self.collators: dict[str, Named] = {}
        self.model_loaders: dict[str, Named] = {}
        self.checks: dict[str, Check] = {}

    def _add(self, table: dict, name: str, value: Any, what: str) -> None:
        if name in table:
            # The first registration wins; built-ins register last (trylast) so user plugins override them.
            return
        table[name] = value

    def register_formatter(self, name: str, formatter: Any, description: str = "", plugin: str = "") -> None:
        self._add(self.formatters, name, Named(name, formatter, plugin, description), "formatter")

    def register_collator(self, name: str, collator: Any, description: str = "", plugin: str = "") -> None:
        self._add(self.collators, name, Named(name, collator, plugin, description), "collator")

    def register_model_loader(self, name: str, loader: Any, description: str = "", plugin: str = "") -> None:
        self._add(self.model_loaders, name, Named(name, loader, plugin, description), "model loader")

    def register_check(self, check: Check) -> None:
        self._add(self.checks, check.name, check, "check")

    def loader_for(self, model_spec: Any) -> Named | None:
        """The first model loader that claims this model (registration order: user plugins first)."""
        for named in self.model_loaders.values():
            if named.obj.claims(model_spec):
                return named
        return None
