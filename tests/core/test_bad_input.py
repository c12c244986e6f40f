"""Broken spec and data files, tried one by one: each is one clear, located error for that spec only.

Every file under ``tests/bad_specs/`` is a case in :data:`CASES`: the message it must produce and where
(``file:line:column``, or the data file and line). They run through ``sft-spec validate`` in-process,
which loads and checks specs without training, so the whole corpus takes seconds.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sft_spec.cli import main
from sft_spec_plugins.collect import data as data_reader

BAD = Path(__file__).resolve().parents[1] / "bad_specs"

#: file -> (message substring, location the error must name). Locations are relative to bad_specs/.
CASES: dict[str, tuple[str, str]] = {
    # YAML itself
    "yaml_tab.sft.yaml": ("YAML does not allow tabs for indentation", "yaml_tab.sft.yaml:3:1"),
    "yaml_unclosed_quote.sft.yaml": (
        "while scanning a quoted scalar started at 2:14",
        "yaml_unclosed_quote.sft.yaml:4:1",
    ),
    "yaml_duplicate_key.sft.yaml": (
        "duplicate key 'model' (first at line 1)",
        "yaml_duplicate_key.sft.yaml:9:1",
    ),
    "yaml_bomb.sft.yaml": ("expands to more than", "yaml_bomb.sft.yaml:1:"),
    "yaml_deep_nesting.sft.yaml": ("nested deeper than", "yaml_deep_nesting.sft.yaml:3:80"),
    "yaml_huge_integer.sft.yaml": ("invalid value: Exceeds the limit", "yaml_huge_integer.sft.yaml:3:19"),
    "yaml_control_character.sft.yaml": (
        "character U+0007 is not allowed",
        "yaml_control_character.sft.yaml:2:20",
    ),
    "yaml_two_documents.sft.yaml": (
        "expected a single document in the stream, but found another document",
        "yaml_two_documents.sft.yaml:2:1",
    ),
    "not_utf8.sft.yaml": ("file is not valid UTF-8 (byte 0xe9)", "not_utf8.sft.yaml:2:17"),
    "unsafe_tag.sft.yaml": (
        "YAML tag '!!python/object/apply:os.system' is not allowed",
        "unsafe_tag.sft.yaml:2:14",
    ),
    "unsafe_tag_mapping.sft.yaml": (
        "YAML tag '!!python/object/new:os.system' is not allowed",
        "unsafe_tag_mapping.sft.yaml:1:8",
    ),
    # shapes
    "empty.sft.yaml": ("the spec file is empty", "empty.sft.yaml:1:1"),
    "top_list.sft.yaml": (
        "holds a mapping of keys (name, model, data, expect, ...), not a list",
        "top_list.sft.yaml:1:1",
    ),
    "top_scalar.sft.yaml": ("not a string", "top_scalar.sft.yaml:1:1"),
    "model_list.sft.yaml": ("model: expected a model id (builtin:NAME", "model_list.sft.yaml:1:1"),
    "data_scalar.sft.yaml": (
        "data: expected a mapping with keys conversations, files, dataset, got string 'hello'",
        "data_scalar.sft.yaml:2:1",
    ),
    "resources_negative_memory.sft.yaml": ("resources.memory: value error, memory must be above zero",
                                           "resources_negative_memory.sft.yaml:6:22"),
    # required keys
    "missing_model.sft.yaml": ("missing required key 'model'", "missing_model.sft.yaml:2:1"),
    "missing_data.sft.yaml": ("missing required key 'data'", "missing_data.sft.yaml:1:1"),
    "missing_model_id.sft.yaml": ("model: missing required key 'id'", "missing_model_id.sft.yaml:1:1"),
    "nothing_to_check.sft.yaml": ("nothing to check: add expect", "nothing_to_check.sft.yaml:1:1"),
    # unknown keys at each level, each with a did-you-mean hint
    "unknown_key_top.sft.yaml": (
        "generaton: unknown key 'generaton'. Did you mean: generation",
        "unknown_key_top.sft.yaml:9:1",
    ),
    "unknown_key_model.sft.yaml": (
        "model.revison: unknown key 'revison'. Did you mean: revision",
        "unknown_key_model.sft.yaml:3:3",
    ),
    "unknown_key_format.sft.yaml": (
        "format.colator: unknown key 'colator'. Did you mean: collator",
        "unknown_key_format.sft.yaml:4:3",
    ),
    "unknown_key_data.sft.yaml": (
        "data.conversation: unknown key 'conversation'. Did you mean: conversations",
        "unknown_key_data.sft.yaml:3:3",
    ),
    "unknown_key_data_file.sft.yaml": (
        "data.files[0].rolemap: unknown key 'rolemap'. Did you mean: role_map",
        "unknown_key_data_file.sft.yaml:5:7",
    ),
    "unknown_key_generation.sft.yaml": (
        "generation.max_tokens: unknown key 'max_tokens'. Did you mean: max_new_tokens",
        "unknown_key_generation.sft.yaml:7:3",
    ),
    "unknown_key_expect.sft.yaml": (
        "expect[0].equal: unknown check 'equal'. Did you mean: equals",
        "unknown_key_expect.sft.yaml:8:5",
    ),
    "unknown_key_prompt_turn.sft.yaml": (
        "unknown key 'contnet'. Did you mean: content",
        "unknown_key_prompt_turn.sft.yaml:8:9",
    ),
    "unknown_key_matrix.sft.yaml": (
        "matrix[0].trainig: unknown key 'trainig'. Did you mean: training",
        "unknown_key_matrix.sft.yaml:11:5",
    ),
    "unknown_key_training.sft.yaml": (
        "training.learning_rat: unknown trl.SFTConfig field 'learning_rat'. Did you mean: learning_rate",
        "unknown_key_training.sft.yaml:4:3",
    ),
    "unknown_key_lora.sft.yaml": (
        "lora.lora_alpa: unknown peft.LoraConfig field 'lora_alpa'. Did you mean: lora_alpha",
        "unknown_key_lora.sft.yaml:5:3",
    ),
    "unknown_training_check.sft.yaml": (
        "unknown training check 'loss_decrease'. Did you mean: loss_decreased",
        "unknown_training_check.sft.yaml:7:3",
    ),
    # wrong types and values
    "wrong_type_generation.sft.yaml": (
        "generation.max_new_tokens: expected an integer, got string 'many'",
        "wrong_type_generation.sft.yaml:7:3",
    ),
    "wrong_type_training.sft.yaml": (
        "training.num_train_epochs: expected float",
        "wrong_type_training.sft.yaml:3:3",
    ),
    "wrong_type_content.sft.yaml": (
        "data.conversations[0][1].content: expected a string, got list",
        "wrong_type_content.sft.yaml:5:27",
    ),
    "wrong_type_method.sft.yaml": (
        "invalid value 'lorra'; expected 'full', 'lora' or 'qlora'. Did you mean: lora",
        "wrong_type_method.sft.yaml:2:1",
    ),
    "wrong_type_equals.sft.yaml": ("expect[0].equals: expected a string", "wrong_type_equals.sft.yaml:8:5"),
    "wrong_type_expect.sft.yaml": (
        "expect: expected a list of expectations",
        "wrong_type_expect.sft.yaml:6:1",
    ),
    "managed_output_dir.sft.yaml": (
        "'output_dir' cannot be set in a spec",
        "managed_output_dir.sft.yaml:3:3",
    ),
    "managed_push_to_hub.sft.yaml": (
        "'push_to_hub' cannot be set in a spec: a spec may not publish models",
        "managed_push_to_hub.sft.yaml:3:3",
    ),
    # conversations
    "empty_conversations.sft.yaml": ("no training conversations", "empty_conversations.sft.yaml:2:1"),
    "empty_conversation.sft.yaml": (
        "a conversation needs at least one user and one assistant turn",
        "empty_conversation.sft.yaml:4:7",
    ),
    "ends_on_user.sft.yaml": ("must end with an assistant turn", "ends_on_user.sft.yaml:4:7"),
    "roles_out_of_order.sft.yaml": (
        "turn 0: expected a user turn, got 'assistant'",
        "roles_out_of_order.sft.yaml:4:7",
    ),
    "unknown_role_after_role_map.sft.yaml": ("turn 1: unknown role 'gpt'", "data/human_gpt.jsonl:2"),
    "prompt_ends_on_assistant.sft.yaml": (
        "the last turn of a prompt must be a user turn",
        "prompt_ends_on_assistant.sft.yaml:7:5",
    ),
    # expectations
    "expect_no_check.sft.yaml": ("an expectation needs at least one check", "expect_no_check.sft.yaml:7:5"),
    "expect_no_prompt.sft.yaml": ("an expectation needs a prompt", "expect_no_prompt.sft.yaml:7:5"),
    "expect_unknown_check.sft.yaml": ("unknown check 'matches'", "expect_unknown_check.sft.yaml:8:5"),
    "invalid_regex.sft.yaml": ("invalid regular expression 'hel(lo'", "invalid_regex.sft.yaml:8:5"),
    # plugin names
    "unknown_formatter.sft.yaml": (
        "unknown formatter 'chat_templat'. Did you mean: chat_template",
        "unknown_formatter.sft.yaml:3:3",
    ),
    "unknown_collator.sft.yaml": (
        "unknown collator 'completion'. Did you mean: completion_only",
        "unknown_collator.sft.yaml:3:3",
    ),
    "unknown_builtin_model.sft.yaml": (
        "unknown builtin model 'tiny-gema'. Did you mean: tiny-gemma",
        "unknown_builtin_model.sft.yaml:1:1",
    ),
    # matrix
    "matrix_no_id.sft.yaml": ("matrix[1]: a matrix entry needs an id", "matrix_no_id.sft.yaml:11:5"),
    "matrix_duplicate_id.sft.yaml": (
        "matrix[1].id: duplicate matrix id 'run' (first at matrix[0])",
        "matrix_duplicate_id.sft.yaml:11:6",
    ),
    # data files
    "data_file_missing.sft.yaml": (
        "data file not found: data/does_not_exist.jsonl",
        "data_file_missing.sft.yaml:4:7",
    ),
    "data_file_empty.sft.yaml": (
        "data file data/empty.jsonl holds no conversations",
        "data_file_empty.sft.yaml:4:7",
    ),
    "data_file_not_utf8.sft.yaml": ("line is not valid UTF-8 (byte 0xe9)", "data/not_utf8.jsonl:2:47"),
    "data_file_not_json.sft.yaml": ("not valid JSON: Expecting property name", "data/not_json.jsonl:3:93"),
    "data_file_not_object.sft.yaml": ("each line must be a JSON object, got list", "data/not_object.jsonl:2"),
    "data_file_too_large.sft.yaml": (
        "data file data/large.jsonl is 1.8 KiB; the limit is 1.0 KiB",
        "data_file_too_large.sft.yaml:4:7",
    ),
    # paths that leave the spec directory
    "data_file_escapes.sft.yaml": (
        "data.files[0].path: data file '../../README.md' is outside the spec directory",
        "data_file_escapes.sft.yaml:4:7",
    ),
    "data_file_absolute.sft.yaml": (
        "data file '/etc/passwd' is an absolute path: files a spec names must lie inside the spec directory",
        "data_file_absolute.sft.yaml:4:7",
    ),
    "template_escapes.sft.yaml": (
        "format.template: template '../../pyproject.toml' is outside the spec directory",
        "template_escapes.sft.yaml:4:3",
    ),
}


@pytest.fixture(autouse=True)
def small_data_limit(monkeypatch):
    # data_file_too_large: a 1 KiB limit stands in for the real one, so no test writes 64 MiB.
    monkeypatch.setattr(data_reader, "MAX_DATA_BYTES", 1024)


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    # Locations are printed relative to the working directory.
    monkeypatch.chdir(BAD.parent.parent)


def validate(capsys, *args: str | Path) -> tuple[int, str]:
    code = main(["validate", *map(str, args)])
    captured = capsys.readouterr()
    return int(code), captured.out + captured.err


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("ERROR") or line.startswith("      ")]


def test_every_bad_spec_has_a_case():
    files = {p.name for p in BAD.glob("*.sft.yaml")}
    assert files == set(CASES), (
        f"untested: {sorted(files - set(CASES))}; missing: {sorted(set(CASES) - files)}"
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_spec_is_one_located_error(name, capsys):
    message, location = CASES[name]
    code, out = validate(capsys, BAD / name)
    assert code == 1, out
    assert "Traceback" not in out
    errors = error_lines(out)
    assert len(errors) == 1, f"expected one error, got:\n{out}"
    assert f"tests/bad_specs/{location}" in errors[0], out
    assert message in errors[0], out
    assert "1 error" in out


def test_unsafe_tags_never_run(capsys, tmp_path, monkeypatch):
    # The tag would write pwned.txt into the working directory if it were ever constructed.
    shutil.copy(BAD / "unsafe_tag.sft.yaml", tmp_path)
    shutil.copy(BAD / "unsafe_tag_mapping.sft.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out = validate(capsys, tmp_path)
    assert code == 1
    assert not (tmp_path / "pwned.txt").exists()
    assert "pwned" not in out.replace("echo pwned", "")


def test_whole_corpus_errors_each_spec_once(capsys):
    code, out = validate(capsys, BAD)
    assert code == 1
    assert "Traceback" not in out
    assert f"0 specs, 0 checks, {len(CASES)} errors collected" in out


def test_good_spec_still_validates_beside_a_bad_one(tmp_path, capsys):
    good = tmp_path / "good.sft.yaml"
    good.write_text(
        (BAD / "matrix_no_id.sft.yaml")
        .read_text()
        .replace("  - {method: lora}\n", "  - {id: lora, method: lora}\n")
    )
    shutil.copy(BAD / "yaml_tab.sft.yaml", tmp_path / "bad.sft.yaml")
    code, out = validate(capsys, tmp_path)
    assert code == 1
    assert "Traceback" not in out
    assert "<Spec " in out and "good.sft.yaml::good[full]" in out and "good.sft.yaml::good[lora]" in out
    assert "bad.sft.yaml:3:1: invalid YAML" in out
    assert "2 specs, 2 checks, 1 error collected" in out


def test_run_reports_the_bad_spec_and_runs_nothing_else_broken(tmp_path, capsys):
    # `run --collect-only` goes through the same collection: the bad spec is an error, exit code 1.
    shutil.copy(BAD / "unknown_key_top.sft.yaml", tmp_path / "typo.sft.yaml")
    code = main(["run", "--collect-only", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "Did you mean: generation" in out and "Traceback" not in out


# -- bounded cost: hostile data costs what max_length allows, and formatting is linear in the turns ---------


class Counting:
    """Wraps one tokenizer method and records what each call was given."""

    def __init__(self, monkeypatch, owner, name: str):
        self.calls: list[tuple] = []
        wrapped = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls.append(args)
            return wrapped(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_a_50_mb_answer_is_cut_to_max_length_before_it_is_tokenized(prepare, tmp_path, monkeypatch, truncation_mode):
    import json

    monkeypatch.setattr(data_reader, "MAX_DATA_BYTES", 64 * 1024 * 1024)  # the real limit, not the corpus's

    from conftest import trained_text

    answer = "学" * (50 * 1024 * 1024 // 3) + "完"  # 50 MB of UTF-8 on one JSON Lines line; its last character differs
    (tmp_path / "big.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "读"},
                                                                 {"role": "assistant", "content": answer}]},
                                                   ensure_ascii=False) + "\n", encoding="utf-8")
    item, run = prepare(f"""\
model: builtin:tiny-gemma
training: {{max_length: 64, truncation_mode: {truncation_mode}}}
checks: {{loss_decreased: true}}
data: {{files: [{{path: big.jsonl}}]}}
""")
    tokenizer = run.loaded.tokenizer
    counting = Counting(monkeypatch, type(tokenizer), "__call__")
    trained = trained_text(item, run)
    longest = max(map(len, tokenizer.get_vocab()))
    tokenized = [len(args[1]) for args in counting.calls]
    assert tokenized and max(tokenized) <= 64 * longest + 64, tokenized  # before: 17 million characters at once
    assert any("cut to" in note for note in run.notes), run.notes
    # The right end is kept: keep_end trains the answer's end (its EOS included), keep_start its beginning.
    assert trained.endswith("完<end_of_turn>\n<eos>") if truncation_mode == "keep_end" else trained.startswith("学学")


def test_formatting_a_conversation_renders_it_a_fixed_number_of_times_whatever_its_length(prepare, tmp_path,
                                                                                          monkeypatch):
    import json

    monkeypatch.setattr(data_reader, "MAX_DATA_BYTES", 64 * 1024 * 1024)

    turns = []
    for i in range(1000):  # 2,000 turns: quadratic formatting took 16 s, 10,000 ran past a 2-minute timeout
        turns += [{"role": "user", "content": f"问题 {i}"}, {"role": "assistant", "content": f"答案 {i}"}]
    (tmp_path / "long.jsonl").write_text(json.dumps({"messages": turns}, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    item, run = prepare("""\
model: builtin:tiny-gemma
format: {collator: assistant_only}
training: {max_length: 100000}
checks: {loss_decreased: true}
data: {files: [{path: long.jsonl}]}
""")
    counting = Counting(monkeypatch, run.loaded.tokenizer, "apply_chat_template")
    formatted = run.config.hook.sft_spec_format(item=item, run=run, messages=item.conversations[0],
                                                add_generation_prompt=False)
    assert len(formatted.assistant_spans) == 1000
    assert [formatted.text[s:e].split("<end_of_turn>")[0] for s, e in formatted.assistant_spans[-2:]] == [
        "答案 998", "答案 999"]
    rendered = [len(args[0]) for args in counting.calls]
    assert len(rendered) <= 3 and sum(rendered) <= 2 * len(turns) + 2, rendered  # before: 2,000 renders


def test_a_broken_matrix_entry_is_an_error_and_its_siblings_still_run(tmp_path, sft):
    spec = tmp_path / "m.sft.yaml"
    spec.write_text((BAD / "matrix_no_id.sft.yaml").read_text().replace("  - {method: lora}\n", "")
                    + "  - {id: good, method: full}\n  - {id: bad, training: {max_length: 64, max_seq_length: 32}}\n",
                    encoding="utf-8")
    result = sft("run", spec, "--co")
    assert "m.sft.yaml::matrix_no_id[good]" in result.out or "::m[good]" in result.out, result.out
    errors = [line for line in result.out.splitlines() if "max_seq_length" in line]
    assert len(errors) == 1 and "both 'max_seq_length' and its new name 'max_length' are set" in errors[0], \
        result.out


def test_a_jinja_syntax_error_in_format_template_is_found_by_validate_at_its_line(sft, tmp_path):
    head = ("model: builtin:tiny-gemma\n"
            "data:\n"
            "  conversations:\n"
            "    - - {role: user, content: a}\n"
            "      - {role: assistant, content: b}\n")
    inline = head + ("format:\n"
                     "  formatter: template\n"
                     "  template: |\n"
                     "    {% for m in messages %}{{ m.content }}\n"
                     "    {% if m.role == 'user' %}U{% endfor %}\n")
    (tmp_path / "inline.sft.yaml").write_text(inline, encoding="utf-8")
    result = sft("validate", tmp_path / "inline.sft.yaml")
    # The block scalar starts on line 9; its second line, line 10, closes a loop while an if is open.
    assert result.code == 1 and "inline.sft.yaml:10" in result.out and "syntax error" in result.out, result.out
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}\n", encoding="utf-8")
    (tmp_path / "file.sft.yaml").write_text(head + "format: {formatter: template, template: chat.jinja}\n",
                                            encoding="utf-8")
    result = sft("validate", tmp_path / "file.sft.yaml")
    assert result.code == 1 and "chat.jinja:2" in result.out and "syntax error" in result.out, result.out


EVERY_ERROR_AT_ONCE = """\
model: builtin:tiny-gemmaa
modle: x
method: lora
lora: {r: "sixteen"}
training: {num_train_epochs: "three", learning_rat: 1}
format: {collator: completion_onl}
data:
  conversations:
    - - {role: user, content: a}
      - {role: assistant, content: b}
expect:
  - {prompt: a, equals: b, equalz: c}
"""


def test_validate_lists_every_independent_error_in_one_run(tmp_path, capsys):
    # A misspelled top-level key used to hide everything else until it was fixed: then the wrong types,
    # then the model name, a pass at a time.
    (tmp_path / "a.sft.yaml").write_text(EVERY_ERROR_AT_ONCE, encoding="utf-8")
    code, out = validate(capsys, tmp_path)
    assert code == 1, out
    found = [re.search(r"a\.sft\.yaml:(\d+):\d+: (\S+)", line).groups() for line in error_lines(out)]
    assert found == [("1", "model:"), ("2", "modle:"), ("4", "lora.r:"), ("5", "training.num_train_epochs:"),
                     ("5", "training.learning_rat:"), ("6", "format.collator:"), ("12", "expect[0].equalz:")], out
    assert "7 errors in 1 file collected" in out


def test_a_broken_known_key_stops_there_rather_than_guess(tmp_path, capsys):
    # Checking the rest against method's default (full) once added "quantization applies to method: qlora;
    # with method: full it would be ignored": an error the user never wrote.
    (tmp_path / "a.sft.yaml").write_text(EVERY_ERROR_AT_ONCE.replace("method: lora", "method: qlor")
                                         + "quantization: {load_in_4bit: true}\n", encoding="utf-8")
    code, out = validate(capsys, tmp_path)
    assert code == 1 and "method: invalid value 'qlor'" in out, out
    assert "with method: full" not in out, out


def test_the_spec_files_errors_come_first_then_each_data_files(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]}\n'
        '{"messages": [{"role": "user", "content": "ping"}]}\n', encoding="utf-8")
    (tmp_path / "s.sft.yaml").write_text("model: builtin:tiny-gemma\nmethod: full\ntraining:\n  learning_rat: 1\n"
                                         "data:\n  files:\n    - path: data/a.jsonl\nexpect:\n  - prompt: ping\n"
                                         "    equalz: pong\n", encoding="utf-8")
    code, out = validate(capsys, tmp_path)
    places = [re.search(r"(s\.sft\.yaml|a\.jsonl):(\d+)", line).groups() for line in error_lines(out)]
    assert places == [("s.sft.yaml", "4"), ("s.sft.yaml", "10"), ("a.jsonl", "2")], out
