"""Plugins add checks, formatters and collators by name; their failures are reported with their name."""

from __future__ import annotations

from sft_spec import hookimpl
from sft_spec.registry import Check, CheckResult


class MaxChars:
    """An outside plugin: a check ``max_chars: N`` on answers."""

    @hookimpl
    def sft_spec_register_checks(self, register):
        def max_chars(answer, limit, ctx):
            return CheckResult(len(answer) <= limit, f"{len(answer)} characters (limit {limit})")

        def validate(value):
            return None if isinstance(value, int) and value > 0 else "max_chars: expected a positive integer"

        register(Check("max_chars", max_chars, "the answer has at most N characters", validate))


def test_a_plugin_adds_a_check_by_name(sft, write_spec, one_answer_spec):
    text = one_answer_spec() + "  - prompt: 微调测试\n    max_chars: 4\n  - prompt: 微调测试\n    max_chars: 3\n"
    result = sft("run", write_spec("plugin.sft.yaml", text), plugins=[MaxChars()])
    cases = result.recorder.reports[0].expectations
    assert [c.outcome for c in cases] == ["passed", "passed", "failed"]
    assert "4 characters (limit 3)" in result.out
    assert result.code == 1


def test_a_plugin_check_validates_its_argument(sft, write_spec, one_answer_spec):
    text = one_answer_spec() + "  - prompt: 微调测试\n    max_chars: many\n"
    result = sft("validate", write_spec("bad_arg.sft.yaml", text), plugins=[MaxChars()])
    assert result.code == 1
    assert "bad_arg.sft.yaml:14:5: expect[1].max_chars: max_chars: expected a positive integer" in result.out


def test_without_the_plugin_the_check_is_unknown(sft, write_spec, one_answer_spec):
    text = one_answer_spec() + "  - prompt: 微调测试\n    max_chars: 4\n"
    result = sft("validate", write_spec("noplugin.sft.yaml", text))
    assert result.code == 1
    assert "unknown check 'max_chars'" in result.out


class ShoutingFormatter:
    """A user formatter registered under the built-in name wins over the built-in (trylast)."""

    @hookimpl
    def sft_spec_register_formatters(self, register):
        from sft_spec_plugins.train.formatters import ChatTemplateFormatter

        class Upper(ChatTemplateFormatter):
            def render(self, messages, tokenizer, template, add_generation_prompt):
                text = super().render(messages, tokenizer, template, add_generation_prompt)
                return text.replace("model\n", "MODEL\n")

        register("chat_template", Upper())


def test_a_user_formatter_overrides_the_builtin_of_the_same_name(prepare, sft):
    from conftest import trained_text

    item, run = prepare("model: builtin:tiny-gemma\nchecks: {loss_decreased: true}\n"
                        "data: {conversations: [[{role: user, content: a}, {role: assistant, content: b}]]}\n",
                        plugins=[ShoutingFormatter()])
    registry = run.config.registry
    assert registry.formatters["chat_template"].obj.__class__.__name__ == "Upper"
    # The built-in registered under the same name is listed as shadowed, not dropped without a word.
    assert [(s.kind, s.name, s.loser) for s in registry.shadowed] == [("formatter", "chat_template", "formatters")]
    # The derived response template follows the user's formatter.
    assert run.markers.response_template == "<start_of_turn>MODEL\n"
    assert trained_text(item, run) == "b<end_of_turn>\n<eos>"
    assert "note: formatter 'chat_template' of plugin 'formatters' is shadowed by plugin 'ShoutingFormatter'" \
        in sft("plugins", plugins=[ShoutingFormatter()]).out


class BrokenTrainer:
    @hookimpl(tryfirst=True)
    def sft_spec_make_trainer(self, item, run, examples):
        raise RuntimeError("boom in a plugin")


def test_an_exception_in_a_plugin_names_the_plugin_and_phase(sft, write_spec, one_answer_spec):
    folder = write_spec("a.sft.yaml", one_answer_spec()).parent
    result = sft("run", folder, plugins=[BrokenTrainer()])
    report = result.recorder.reports[0]
    assert report.outcome == "error"
    assert report.error.phase == "train"
    assert report.error.plugin == "BrokenTrainer"
    assert "RuntimeError: boom in a plugin" in result.out
    assert "Traceback" not in result.out
    assert result.code == 1
    long = sft("run", "--tb=long", folder, plugins=[BrokenTrainer()])
    assert "Traceback" in long.out


class MisspelledHook:
    @hookimpl
    def sft_spec_lod_model(self, item, config):  # a typo: pluggy would never call it
        return None


def test_a_misspelled_hook_is_an_error_naming_the_plugin_and_the_hook(sft, write_spec, one_answer_spec, tmp_path):
    import json

    path = write_spec("one.sft.yaml", one_answer_spec())
    result = sft("run", path, "--json", tmp_path / "r.json", plugins=[MisspelledHook()])
    assert result.code == 1
    assert ("plugin 'MisspelledHook' is broken: implements no such hook: sft_spec_lod_model (did you mean "
            "sft_spec_load_model?)") in result.out
    assert result.recorder.by_id("one").outcome == "passed"  # the other specs still ran
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["exitstatus"] == 1 and [s["nodeid"] for s in doc["specs"]][0] == "plugin:MisspelledHook"


def test_getoption_of_an_unknown_name_raises(prepare):
    import pytest

    _, run = prepare("model: builtin:tiny-gemma\nchecks: {loss_decreased: true}\n"
                     "data: {conversations: [[{role: user, content: a}, {role: assistant, content: b}]]}\n")
    assert run.config.getoption("device") == "cpu"
    with pytest.raises(ValueError, match="no option named 'devcie'"):
        run.config.getoption("devcie")


def test_an_essential_plugin_cannot_be_disabled(sft, write_spec, one_answer_spec):
    result = sft("run", write_spec("one.sft.yaml", one_answer_spec()), "-p", "no:trainer")
    assert result.code == 4
    assert "'trainer' is an essential built-in plugin; without it nothing would be trained" in result.err
    assert sft("run", write_spec("one.sft.yaml", one_answer_spec()), "-p", "no:html_report", "--co").code == 0


BROKEN_PLUGINS = {
    "raises_at_import.py": "raise RuntimeError('this plugin needs a GPU')\n",
    "syntax_error.py": "def broken(:\n",
}


def test_broken_plugins_are_reported_and_the_specs_still_run(sft, write_spec, one_answer_spec, tmp_path,
                                                              monkeypatch):
    import json

    for name, text in BROKEN_PLUGINS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_spec("one.sft.yaml", one_answer_spec())
    # -p of a module that is registered already (the built-in checks plugin) is no error at all.
    result = sft("run", path, "-p", "raises_at_import", "-p", "syntax_error", "-p", "sft_spec_plugins.check.checks",
                 "--json", tmp_path / "r.json")
    assert result.code == 1
    broken = "plugin 'raises_at_import' is broken: cannot be imported: RuntimeError: this plugin needs a GPU"
    assert broken in result.out
    assert "plugin 'syntax_error' is broken: cannot be imported: SyntaxError" in result.out
    assert result.recorder.by_id("one").outcome == "passed"
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["exitstatus"] == result.code == 1
    assert doc["summary"]["outcomes"] == {"error": 2, "passed": 1}


class LateReporter:
    """Registered at configure time, as reporters are: its misspelled hook is caught there too."""

    @hookimpl
    def sft_spec_log_reprot(self, report):
        pass


class RegistersLate:
    @hookimpl
    def sft_spec_configure(self, config):
        config.pluginmanager.register(LateReporter(), "late-reporter")


def test_a_misspelled_hook_of_a_plugin_registered_at_configure_time_is_an_error(sft, write_spec, one_answer_spec,
                                                                             tmp_path):
    import json

    result = sft("run", write_spec("one.sft.yaml", one_answer_spec()), "--json", tmp_path / "r.json",
                 plugins=[RegistersLate()])
    assert result.code == 4
    assert "plugin 'late-reporter': unknown hook 'sft_spec_log_reprot'" in result.err
    assert json.loads((tmp_path / "r.json").read_text())["exitstatus"] == 4


def test_a_usage_error_inside_the_session_is_the_exit_status_in_the_json(sft, write_spec, one_answer_spec, tmp_path):
    import json

    path = write_spec("one.sft.yaml", one_answer_spec())
    result = sft("run", path, "-k", "lora and (", "--json", tmp_path / "r.json")
    assert result.code == 4
    assert json.loads((tmp_path / "r.json").read_text())["exitstatus"] == 4


class TakesRun:
    @hookimpl
    def sft_spec_register_commands(self, register):
        register("run", "my own run", lambda parser: None, lambda options, pm: 0)


def test_a_plugin_cannot_take_a_subcommand_the_core_has(sft):
    result = sft("plugins", plugins=[TakesRun()])
    assert result.code == 3
    assert "BROKEN TakesRun: subcommand 'run' is the core's already" in result.out


class BudgetAndExamples:
    """A plugin that sets every answer's budget and builds the training examples itself."""

    def __init__(self):
        self.examples_made = 0

    @hookimpl(tryfirst=True)
    def sft_spec_answer_budget(self, item, run, checks):
        return 5

    @hookimpl(tryfirst=True)
    def sft_spec_make_examples(self, item, run):
        self.examples_made += 1
        hook = run.config.hook
        return [hook.sft_spec_make_mask(item=item, run=run, formatted=hook.sft_spec_format(
            item=item, run=run, messages=conversation, add_generation_prompt=False), index=i)
            for i, conversation in enumerate(item.conversations)]


def test_answer_budgets_and_training_examples_come_from_hooks(sft, write_spec, one_answer_spec):
    # The run protocol imported the generation plugin's budget function and the collators' batched
    # masking: a plugin could change neither. They are hooks now.
    plugin = BudgetAndExamples()
    result = sft("run", write_spec("b.sft.yaml", one_answer_spec()), "--no-cache", plugins=[plugin])
    report = result.recorder.reports[0]
    assert plugin.examples_made == 1 and report.mask is not None, result.out
    assert report.expectations[0].max_new_tokens == 5, result.out


def test_a_template_that_breaks_on_a_later_conversation_names_it(sft, write_spec):
    text = """\
        model: builtin:tiny-gemma
        format:
          template: >-
            {% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}{% endif %}
            {{ m.role }}: {{ m.content }} {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}
          response_template: "assistant: "
        data:
          conversations:
            - - {role: user, content: a}
              - {role: assistant, content: b}
            - - {role: user, content: boom}
              - {role: assistant, content: c}
        expect:
          - {prompt: a, equals: b}
    """
    result = sft("run", write_spec("t.sft.yaml", text), "--no-cache")
    report = result.recorder.reports[0]
    assert report.outcome == "error" and report.error.phase == "format", result.out
    assert "conversation 1: " in report.error.message and "no boom" in report.error.message, result.out


class ExamplesAsDataset:
    """The documented contract: a datasets.Dataset with input_ids and labels (no other column)."""

    @hookimpl(tryfirst=True)
    def sft_spec_make_examples(self, item, run):
        import datasets

        hook = run.config.hook
        masked = [hook.sft_spec_make_mask(item=item, run=run, formatted=f, index=i)
                  for i, f in enumerate(run.formatted)]
        return datasets.Dataset.from_dict({"input_ids": [m.input_ids for m in masked],
                                           "labels": [m.labels for m in masked]})


def test_a_plugins_examples_as_a_dataset_train(sft, write_spec, one_answer_spec):
    # The summary read a "trained" column only the built-in large-data path writes: KeyError in phase mask.
    second = "    - - {role: user, content: 你好}\n      - {role: assistant, content: 你好}\n"
    text = one_answer_spec().replace("      - {role: assistant, content: 我学会了}\n",
                                     "      - {role: assistant, content: 我学会了}\n" + second, 1)
    result = sft("run", write_spec("d.sft.yaml", text), "--no-cache", plugins=[ExamplesAsDataset()])
    report = result.recorder.reports[0]
    assert report.outcome == "passed", result.out
    assert report.mask.examples == 2 and 0 < report.mask.trained_tokens < report.mask.total_tokens
    # The first example's own mask, token by token (a name clash once replaced it with every example's).
    assert len(report.mask.trained) == len(report.mask.tokens) and not report.mask.trained[0]
