"""Named things plugins register (``sft_spec_register_*``, llm/datasette style): formatters, collators,
model loaders, checks, spec sections. A name registered twice keeps the first (user plugins register
before the ``trylast`` built-ins); the shadowed one is listed, never dropped silently."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

# Re-exported: plugins written for sft-spec 0.1 import these from here.
from .state import FormattedText, MaskedExample  # noqa: F401

if TYPE_CHECKING:
    from .config import Config
    from .state import Answer, Case, FormattedText, SpecItem, SpecRun

T = TypeVar("T")


@dataclass
class CheckResult:
    passed: bool
    message: str = ""
    expected: str | None = None  # text to diff the answer against, when the check has one
    score: float | None = None  # a metric's value, for reports and thresholds


@dataclass
class CheckContext:
    """What a check may look at besides the answer."""

    item: SpecItem
    run: SpecRun | None = None
    case: Case | None = None
    answer: Answer | None = None
    base_answer: str | None = None
    prompt: FormattedText | None = None  # the case's prompt as the model saw it (generation prompt added)
    losses: list[float] = field(default_factory=list)

    @property
    def config(self) -> Config | None:
        return self.run.config if self.run is not None else None


@dataclass
class Check:
    """A named check. ``scope='answer'`` checks a generated answer; ``'training'`` checks the run."""

    name: str
    func: Callable[[Any, Any, CheckContext], CheckResult]
    description: str = ""
    validate: Callable[[Any], str | None] | None = None
    scope: Literal["answer", "training"] = "answer"
    needs_base_answer: bool = False
    #: ``batch([(answer, argument, ctx), ...]) -> [CheckResult, ...]``: many at once (one forward pass).
    batch: Callable[[list[tuple[str, Any, CheckContext]]], list[CheckResult]] | None = None
    plugin: str = ""


@dataclass
class Named:
    """A registered formatter, collator or model loader with its plugin's name."""

    name: str
    obj: Any
    plugin: str = ""
    description: str = ""


@dataclass(frozen=True)
class SpecSection(Generic[T]):
    """A top-level spec key a plugin owns (``launcher:``), validated with a pydantic model.

    ``shorthand`` turns other accepted forms into the mapping the model reads (``resources: 2`` ...);
    with ``default``, a spec that leaves the key out gets the model's defaults. Read it back with
    ``item.section(LAUNCHER)``, typed as the model.
    """

    name: str
    model: type[T]
    description: str = ""
    shorthand: Callable[[Any], Any] | None = None
    default: bool = False
    required: bool = False
    plugin: str = ""


@dataclass(frozen=True)
class Shadowed:
    """A registration that lost to an earlier one of the same name."""

    kind: str
    name: str
    winner: str
    loser: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r} of plugin {self.loser!r} is shadowed by plugin {self.winner!r}'s"


class Registry:
    """Formatters, collators, model loaders, checks and spec sections, by name."""

    def __init__(self) -> None:
        self.formatters: dict[str, Named] = {}
        self.collators: dict[str, Named] = {}
        self.model_loaders: dict[str, Named] = {}
        self.checks: dict[str, Check] = {}
        self.sections: dict[str, SpecSection[Any]] = {}
        self.shadowed: list[Shadowed] = []

    def _add(self, table: dict, kind: str, name: str, value: Any, plugin: str) -> None:
        if name in table:
            self.shadowed.append(Shadowed(kind, name, getattr(table[name], "plugin", ""), plugin))
        else:
            table[name] = value

    def register_formatter(self, name: str, formatter: Any, description: str = "", plugin: str = "") -> None:
        self._add(self.formatters, "formatter", name, Named(name, formatter, plugin, description), plugin)

    def register_collator(self, name: str, collator: Any, description: str = "", plugin: str = "") -> None:
        self._add(self.collators, "collator", name, Named(name, collator, plugin, description), plugin)

    def register_model_loader(self, name: str, loader: Any, description: str = "", plugin: str = "") -> None:
        self._add(self.model_loaders, "model loader", name, Named(name, loader, plugin, description), plugin)

    def register_check(self, check: Check, plugin: str = "") -> None:
        check.plugin = check.plugin or plugin
        self._add(self.checks, "check", check.name, check, check.plugin)

    def register_section(self, section: SpecSection[Any], plugin: str = "") -> None:
        object.__setattr__(section, "plugin", section.plugin or plugin)  # frozen: set once, by its registration
        self._add(self.sections, "spec section", section.name, section, section.plugin)

    def loader_for(self, model_spec: Any) -> Named | None:
        """The first model loader that claims this model (registration order: user plugins first)."""
        for named in self.model_loaders.values():
            if named.obj.claims(model_spec):
                return named
        return None
