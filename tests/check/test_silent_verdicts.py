"""Gates that must not pass in silence: shares of seeds rounded up, seeds that are seeds, thresholds that
bound something, and row values that fill a pattern as literal text."""

from __future__ import annotations

import json

import pytest

from sft_spec_plugins.run.repeat import RepeatSpec


@pytest.mark.parametrize("share,seeds,needed", [(0.5, 1, 1), (0.67, 3, 2), (0.66, 3, 2), (0.34, 3, 1),
                                                (0.01, 5, 1), (1.0, 4, 4), (0.0, 3, 0), (0.5, 4, 2)])
def test_a_share_of_seeds_is_rounded_up_never_to_no_seed(share, seeds, needed):
    assert RepeatSpec(seeds=list(range(seeds)), pass_rate=share).needed == needed


@pytest.mark.parametrize("seeds", [[-1], [True], [1, "2"], [1.5]])
def test_seeds_are_whole_numbers_from_zero(seeds):
    with pytest.raises(ValueError, match="whole numbers from 0 up"):
        RepeatSpec(seeds=seeds)


SET = """\
model: builtin:tiny-gemma
training: {{num_train_epochs: 1, learning_rate: 1.0e-3}}
generation: {{max_new_tokens: 4}}
data:
  conversations:
    - - {{role: user, content: a}}
      - {{role: assistant, content: b}}
eval:
  s:
    rows: {rows}
    prompt: q
    reference: r
    checks: {checks}
{extra}
"""


@pytest.mark.parametrize("extra", ["    change: {chrf: {}}", "    change: {chrf: {max_drop: .nan}}",
                                   "    mean: {chrf: {at_most: .inf}}"])
def test_a_change_or_bound_that_bounds_nothing_is_a_located_error(tmp_path, sft, extra):
    path = tmp_path / "s.sft.yaml"
    path.write_text(SET.format(rows='[{"q": "x", "r": "y"}]', checks="{chrf: {}}", extra=extra), encoding="utf-8")
    result = sft("validate", path)
    assert result.code == 1 and "s.sft.yaml:" in result.out, result.out


def test_a_reference_fills_a_regex_as_literal_text(tmp_path, sft):
    rows = json.dumps([{"q": "x", "r": ".*"}, {"q": "y", "r": "a+b"}])
    path = tmp_path / "s.sft.yaml"
    path.write_text(SET.format(rows=rows, checks="{regex: '^{reference}$'}", extra=""), encoding="utf-8")
    result = sft("run", path, "--no-cache")
    case = result.recorder.reports[0].training_checks[0]
    assert case.outcome == "failed", case.checks[0].message  # '.*' would have matched any answer
    assert "pass_rate 0 " in case.checks[0].message


TEMPLATED = """\
model: builtin:tiny-gemma
training: {num_train_epochs: 4, learning_rate: 1.0e-2, chat_template_path: chat.jinja}
data:
  conversations:
    - - {role: user, content: a}
      - {role: assistant, content: b}
checks: {loss_decreased: true}
"""
CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<start_of_turn>user\\n{{ m['content'] }}"
        "<end_of_turn>\\n{% else %}<start_of_turn>model\\n{{ m['content'] }}END\\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\\n{% endif %}")


def test_two_specs_with_one_template_name_in_two_folders_each_train_with_their_own(tmp_path, sft, monkeypatch):
    monkeypatch.setenv("SFT_SPEC_CACHE", str(tmp_path / "cache"))
    for folder, end in (("one", "<end_of_turn>"), ("two", "")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "chat.jinja").write_text(CHAT.replace("END", end), encoding="utf-8")
        (tmp_path / folder / f"{folder}.sft.yaml").write_text(TEMPLATED, encoding="utf-8")
    result = sft("run", tmp_path / "one", tmp_path / "two", "--no-cache")
    trained = {r.name: r.mask.trained_text for r in result.recorder.reports}
    assert "<end_of_turn>" in trained["one"] and "<end_of_turn>" not in trained["two"], trained
    sft("run", tmp_path / "two")
    again = sft("run", tmp_path / "two")
    assert "result cache: 1 reused" in again.out, again.out
    (tmp_path / "two" / "chat.jinja").write_text(CHAT.replace("END", "<end_of_turn>"), encoding="utf-8")
    edited = sft("run", tmp_path / "two")  # an edited template file is another recipe
    assert "result cache: 0 reused" in edited.out and "<end_of_turn>" in edited.recorder.reports[0].mask.trained_text


def test_a_missing_template_file_is_an_error_at_its_key(tmp_path, sft):
    (tmp_path / "s.sft.yaml").write_text(TEMPLATED, encoding="utf-8")
    result = sft("validate", tmp_path / "s.sft.yaml")
    assert result.code == 1 and "s.sft.yaml:2:" in result.out and "no such file" in result.out, result.out


def test_a_reference_is_kept_as_written_and_nan_is_not_json(tmp_path, sft):
    (tmp_path / "rows.jsonl").write_text('{"q": "x", "r": 1.50}\n{"q": "y", "r": 1e2}\n', encoding="utf-8")
    path = tmp_path / "s.sft.yaml"
    path.write_text(SET.format(rows="[]", checks="{equals: '{reference}'}", extra="").replace(
        "rows: []", "path: rows.jsonl"), encoding="utf-8")
    result = sft("run", path, "--no-cache", "--json", tmp_path / "r.json")
    data = next(iter(json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["specs"][0]["eval_sets"]
                     .values()))
    assert sorted(row["reference"] for row in data["rows"]) == ["1.50", "1e2"], data["rows"]
    assert result.code == 1  # a tiny model does not answer "1.50"
    (tmp_path / "rows.jsonl").write_text('{"q": "x", "r": NaN}\n', encoding="utf-8")
    invalid = sft("validate", path)
    assert invalid.code == 1 and "rows.jsonl:1" in invalid.out and "NaN is not JSON" in invalid.out, invalid.out
