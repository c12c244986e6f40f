"""Property test: whatever a spec file holds, loading it gives spec items or located spec errors.

Random and mutated specs (keys deleted, values replaced by random types, random keys inserted, random
unicode, random YAML text) must never crash the loader with another exception, and every error must
point at a file and a line, so the user can find it.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import load_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_spec.errors import SpecError, SpecErrors
from sft_spec.loading import LoadContext, load_spec_file
from sft_spec.state import SpecItem

VALID: dict[str, Any] = {
    "name": "prop",
    "tags": ["smoke"],
    "model": {"id": "builtin:tiny-gemma", "dtype": "float32"},
    "method": "lora",
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "format": {"formatter": "chat_template", "collator": "completion_only", "response_template": "<r>"},
    "training": {"num_train_epochs": 2, "learning_rate": 1.0e-3, "seed": 1},
    "data": {
        "conversations": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]],
        "files": [{"path": "data/good.jsonl", "role_map": {"human": "user"}}],
    },
    "generation": {"max_new_tokens": 8},
    "expect": [
        {"prompt": "hi", "equals": "hello", "before": {"not_equals": "hello"}},
        {"prompt": [{"role": "user", "content": "hi"}], "regex": "h.llo", "contains": ["he", "lo"]},
    ],
    "checks": {"loss_decreased": True},
    "matrix": [{"id": "a", "method": "full"}, {"id": "b", "training": {"learning_rate": 0.01}}],
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "builtin:tiny-gemma",
            "lora",
            "user",
            "assistant",
            "../x",
            "{{ x }}",
            "data/good.jsonl",
            "(",
            "",
            "chat_template",
            "equals",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(0, 3)), inner, max_size=3),
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path into ``node``, the root included."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _mutate(spec: dict, draw) -> Any:
    root: Any = spec
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(root))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["delete", "replace", "insert", "rename"]))
        if not path:
            if op == "replace":
                root = draw(values)
            continue
        parent = root
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if op == "delete":
            del parent[last]
        elif op == "replace":
            parent[last] = draw(values)
        elif op == "insert" and isinstance(parent[last], dict):
            parent[last][draw(st.one_of(st.text(max_size=10), st.integers(0, 5)))] = draw(values)
        elif op == "rename" and isinstance(parent, dict):
            parent[str(last) + draw(st.text(max_size=2))] = parent.pop(last)
    return root


@st.composite
def spec_texts(draw) -> str:
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "text-edit", "random-yaml", "random-text"]))
    if kind == "random-text":
        return draw(st.text(max_size=200))
    if kind == "random-yaml":
        return yaml.safe_dump(draw(values), allow_unicode=True)
    spec = _mutate(copy.deepcopy(VALID), draw)
    text = yaml.safe_dump(spec, allow_unicode=True, sort_keys=False)
    if kind == "text-edit":
        # Splice random characters into the YAML itself: broken indentation, quotes, tags, anchors.
        at = draw(st.integers(0, len(text)))
        junk = draw(
            st.text(alphabet=st.sampled_from(list(" \t\n:-'\"[]{}&*!|>%@`#,?") + ["é", "\x00"]), max_size=4)
        )
        text = text[:at] + junk + text[at:]
    return text


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Path, LoadContext]]:
    with tempfile.TemporaryDirectory(prefix="sft-spec-props-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        (root / "data" / "good.jsonl").write_text(
            '{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n',
            encoding="utf-8",
        )
        yield root, load_context(root)


def _check_outcome(path: Path, ctx: LoadContext) -> list[SpecItem] | SpecError:
    try:
        items = load_spec_file(path, ctx)
    except SpecError as exc:
        errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
        assert errors
        for error in errors:
            assert error.message and isinstance(error.message, str)
            assert error.location is not None, f"unlocated error: {error}"
            assert error.location.path, f"error without a file: {error}"
            assert error.location.line > 0, f"error without a line: {error}"
        return exc
    assert isinstance(items, list) and items
    assert all(isinstance(item, SpecItem) for item in items)
    return items


def test_the_valid_spec_loads(env):
    root, ctx = env
    path = root / "prop.sft.yaml"
    path.write_text(yaml.safe_dump(VALID, allow_unicode=True), encoding="utf-8")
    items = _check_outcome(path, ctx)
    assert isinstance(items, list) and [i.variant for i in items] == ["a", "b"]


# database=None: no .hypothesis/ folder in the repo; a failure prints its example to reproduce.
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=spec_texts())
def test_any_spec_loads_or_fails_with_located_errors(env, text):
    root, ctx = env
    ctx.defaults.clear()
    path = root / "prop.sft.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check_outcome(path, ctx)


def test_specs_never_share_nested_values_with_defaults_or_matrix_siblings(sft, write_spec, tmp_path):
    """The old name read as the new one in one spec's copy must not change the next spec's: before, a
    shallow merge shared ``training`` with the cached defaults and with the sibling matrix entry."""
    write_spec("sft-defaults.yaml", "training: {max_seq_length: 256}\n", folder=tmp_path)
    common = ("model: builtin:tiny-gemma\nchecks: {loss_decreased: true}\n"
              "data: {conversations: [[{role: user, content: a}, {role: assistant, content: b}]]}\n")
    write_spec("a.sft.yaml", common)
    write_spec("b.sft.yaml", common + "training: {max_seq_length: 128}\n")
    write_spec("m.sft.yaml", common + "matrix:\n  - {id: one}\n  - {id: two}\n")
    result = sft("run", "--co", tmp_path)
    assert result.code == 0, result.out
    assert "both 'max_seq_length' and its new name" not in result.out
    notes = [line for line in result.out.splitlines() if "training.max_seq_length is now max_length" in line]
    assert len(notes) == 4, result.out  # a, b and both matrix entries each read the old name, each with its note
