"""The plugin, installed, seen by sft-spec through its entry point: a tiny model trains with the
``plain`` formatter, then ``max_chars`` passes and fails on its answer."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

from sft_spec_max_chars import PlainFormatter, validate_max_chars

from sft_spec.cli import main

# builtin:tiny-gemma is a random 141k-parameter model: no download, trains in about a second on a CPU.
SPEC = """\
    model: builtin:tiny-gemma
    method: full
    format: {formatter: plain}
    training: {num_train_epochs: 30, learning_rate: 3.0e-3, per_device_train_batch_size: 8}
    data:
      conversations:
        - - {role: user, content: 微调测试}
          - {role: assistant, content: 我学会了}
    expect:
      - prompt: 微调测试
        equals: 我学会了
        max_chars: 4
      - prompt: 微调测试
        max_chars: 3
"""


def write(tmp_path, text: str):
    path = tmp_path / "max_chars.sft.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_the_formatter_marks_what_the_model_learns():
    tokenizer = SimpleNamespace(bos_token="<bos>", eos_token="<eos>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    formatted = PlainFormatter().format(messages, tokenizer, None)
    assert formatted.text == "<bos>User: hi\nAssistant: hello<eos>"
    start, end = formatted.assistant_spans[0]
    assert formatted.text[start:end] == "hello<eos>"
    prompt = PlainFormatter().format(messages[:1], tokenizer, None, add_generation_prompt=True)
    assert prompt.text == "<bos>User: hi\nAssistant: "


def test_the_argument_is_validated():
    assert validate_max_chars(4) is None
    for bad in (0, -1, "many", True, 2.5):
        assert "positive integer" in validate_max_chars(bad)


def test_trains_and_checks_pass_and_fail(tmp_path, capsys):
    code = main(["run", str(write(tmp_path, SPEC)), "-v"])
    out = capsys.readouterr().out
    assert "expect[0] PASSED" in out, out
    assert "expect[1] FAILED" in out, out
    assert "4 characters (limit 3)" in out
    assert code == 1  # one failed check fails the run


def test_a_bad_argument_is_a_located_error(tmp_path, capsys):
    path = write(tmp_path, SPEC.replace("max_chars: 3", "max_chars: many"))
    code = main(["validate", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "max_chars.sft.yaml:14:5: expect[1].max_chars: max_chars: expected a positive integer" in out, out


def test_sft_spec_plugins_lists_it_with_its_version(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "max_chars 0.1.0  (sft_spec_max_chars)" in out
    assert "formatters: plain" in out
