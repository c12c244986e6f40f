"""The types every phase shares: a spec item, a run of it (each phase fills its fields, later ones read
them), and typed stash keys for plugins' own state, as pytest's: the key says the value's type, a typo
is a NameError, ``grep`` finds every use. Nothing here imports torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast

if TYPE_CHECKING:
    from .config import Config
    from .errors import Location, SpecError
    from .loading.yamlsource import LocatedDocument
    from .registry import SpecSection
    from .spec import Spec, XfailSpec

T = TypeVar("T")
D = TypeVar("D")

#: A conversation: ``[{"role": ..., "content": ...}, ...]``.
Conversation = list[dict[str, str]]


class LocatedConversation(list):
    """A conversation that knows where it was written (``data/train.jsonl:17``): a data reader may return
    these, so an error about a conversation points at its line."""

    location: Location | None = None
    #: A plain text (a ``text`` layout row: no roles, no template), which the formatter passes through.
    plain_text: str | None = None
#: When an answer is generated: from the base model, while it trains (``learns_within`` and
#: ``--stop-when-learnt`` probes), or from the trained one.
When = Literal["before", "during", "after"]


class StashKey(Generic[T]):
    """A key of a :class:`Stash`; ``StashKey[list[str]]()`` stores a ``list[str]``."""

    __slots__ = ()


class Stash:
    """Plugin state by typed key (pytest's ``Stash``): ``config.stash[my_key] = value``."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    # One-liners, as a dict's: the casts only tell type checkers what each key holds.
    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value
    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])
    def get(self, key: StashKey[T], default: D) -> T | D:
        return cast("T | D", self._data.get(key, default))
    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._data.setdefault(key, default))
    def __contains__(self, key: StashKey[T]) -> bool:
        return key in self._data


@dataclass
class FormattedText:
    """A conversation rendered as the model sees it.

    ``assistant_spans`` are the character ranges of each assistant turn's text including its end-of-turn
    marker: what a multi-turn mask trains, and where a response template may not be looked for.
    """

    text: str
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)
    prompt_end: int = 0  # where the last assistant turn starts
    max_new_tokens: int | None = None  # this prompt's own answer budget (None: the generation setting)


@dataclass
class MaskedExample:
    """Token ids and labels (-100 where no loss) of one training conversation."""

    input_ids: list[int]
    labels: list[int]
    formatted: FormattedText
    offsets: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings for the report (a token across the boundary)


@dataclass(frozen=True)
class ChatMarkers:
    """What a chat template puts around an answer, derived once per spec after the model is loaded."""

    response_template: str  # what the generation prompt adds before an answer: "<start_of_turn>model\n"
    end_of_turn: str | None  # the special token right after an answer: "<end_of_turn>"


@dataclass
class Answer:
    """One generated answer: ``text`` cleaned (special tokens removed, stripped), ``raw`` as generated."""

    text: str
    raw: str = ""
    stopped: bool = True  # generation ended the turn itself (False: cut at max_new_tokens)
    new_tokens: int = 0
    max_new_tokens: int = 0


@dataclass
class Expectation:
    """One ``expect[i]`` entry: a prompt and the checks its answer must pass."""

    index: int
    nodeid: str
    prompt: Conversation
    checks: list[tuple[str, Any]]
    before: list[tuple[str, Any]]
    location: Location
    selected: bool = True
    xfail: XfailSpec | None = None  # this check is expected to fail (the spec's other checks are not)

    @property
    def needs_base_answer(self) -> bool:
        return bool(self.before)


@dataclass
class TrainingCheck:
    """One entry of ``checks:`` (``checks[loss_decreased]``): a test case about the run, not an answer."""

    name: str
    argument: Any
    nodeid: str
    location: Location
    selected: bool = True
    index: int = -1
    xfail: XfailSpec | None = None  # a plugin's case may set its own (an eval set); else the spec's applies


#: A test case of a spec: an expectation or a training check.
Case = Expectation | TrainingCheck


@dataclass
class SpecItem:
    """One runnable spec: a file's spec with one matrix entry applied."""

    nodeid: str
    path: Path
    name: str
    variant: str | None
    spec: Spec
    conversations: list[Conversation]
    expectations: list[Expectation]
    training_checks: list[TrainingCheck]
    location: Location
    chat_template: str | None = None
    sources: list[Location] = field(default_factory=list)  # where each conversation was written
    notes: list[str] = field(default_factory=list)
    doc: LocatedDocument | None = None
    #: Plugin-owned top-level keys (``launcher:``, ...), validated by the model each plugin registered.
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> list[str]:
        return self.spec.tags

    @property
    def folder(self) -> Path:
        """The spec file's own folder: every file a spec names must lie inside it."""
        return self.path.resolve().parent

    @property
    def selected_expectations(self) -> list[Expectation]:
        return [e for e in self.expectations if e.selected]

    @property
    def selected_training_checks(self) -> list[TrainingCheck]:
        return [c for c in self.training_checks if c.selected]

    @property
    def cases(self) -> list[Case]:
        return [*self.expectations, *self.training_checks]

    @property
    def selected_cases(self) -> list[Case]:
        return [c for c in self.cases if c.selected]

    def section(self, section: SpecSection[T]) -> T | None:
        """A plugin's own top-level key, as its model, or None when the spec leaves it out."""
        return cast("T | None", self.sections.get(section.name))

    def locate(self, *keypath: str | int) -> Location:
        """Where ``keypath`` was written (the spec's first line when it was not)."""
        return self.doc.locate(keypath) if self.doc is not None else self.location

    def conversation_error(self, index: int, error: SpecError, fallback: Location | None = None) -> SpecError:
        """``error`` said of training conversation ``index``: named, and located where the conversation was
        written (its line in a data file) unless the error has a place of its own."""
        from .errors import SpecError

        where = self.sources[index] if index < len(self.sources) else fallback
        return SpecError(f"conversation {index}: {error.message}", error.location or where, error.key)


@dataclass
class LoadedModel:
    """A model ready to train, with what generation and reports need to know about it."""

    model: Any
    tokenizer: Any
    device: str
    source: str  # what was loaded, for reports
    dtype: str = ""
    quantization: str | None = None  # how the weights are quantized, for reports ("4-bit nf4, ...")
    loader: str = ""  # the registered loader that loaded it
    notes: list[str] = field(default_factory=list)  # what loading changed from what was asked, for every report
    #: Set by a spec that changed the weights, config or tokenizer: the next spec gets a fresh load.
    dirty: bool = False
    stash: Stash = field(default_factory=Stash)
    #: Called with the run after every spec that used this model, once its own cleanup ran (the last of
    #: its finalizers): what they say with ``run.note`` is in that spec's report.
    after_run: list[Callable[[SpecRun], None]] = field(default_factory=list)


@dataclass
class SpecRun:
    """One spec while it runs: each phase fills its fields, later phases read them."""

    item: SpecItem
    config: Config
    loaded: LoadedModel | None = None
    model: Any = None  # the model being trained (a peft model for LoRA)
    markers: ChatMarkers | None = None  # set once after load
    #: Training conversations as text: the format phase's (up to 2,000), then the examples hook's.
    formatted: list[FormattedText] = field(default_factory=list)
    prompts: list[FormattedText] = field(default_factory=list)  # expectation prompts, with the generation prompt
    #: The training examples (``sft_spec_make_examples``): masked examples, or for large data a
    #: ``datasets.Dataset`` with ``input_ids`` and ``labels``.
    examples: list[MaskedExample] | Any = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    base_answers: dict[int, Answer] = field(default_factory=dict)  # by expectation index, before training
    answers: dict[int, Answer] = field(default_factory=dict)  # by expectation index, after training
    notes: list[str] = field(default_factory=list)  # what the harness changed, shown in every report
    settings: dict[str, Any] = field(default_factory=dict)  # effective recipe settings
    metrics: dict[str, Any] = field(default_factory=dict)
    #: While set, notes go to it instead of the report (``bulk`` masking counts them by kind).
    note_sink: Callable[[str], None] | None = None
    finalizers: list[Callable[[], None]] = field(default_factory=list)
    stash: Stash = field(default_factory=Stash)

    def note(self, message: str) -> None:
        if self.note_sink is not None:  # a phase that groups its notes (one per kind, with a count)
            self.note_sink(message)
        elif message not in self.notes:
            self.notes.append(message)

    def addfinalizer(self, fn: Callable[[], None]) -> None:
        """Called after the spec, even when it failed (e.g. to remove LoRA adapters from a shared base)."""
        self.finalizers.append(fn)
