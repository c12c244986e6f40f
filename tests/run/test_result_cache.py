"""Result cache: a second run of an unchanged suite trains nothing and reports the same outcomes; a changed
spec, --no-cache and a damaged entry train again; `sft-spec cache clear` empties it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sft_spec import hookimpl

SPEC = """\
    model: builtin:tiny-gemma
    method: {method}
    lora: {{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}}
    training: {{num_train_epochs: 2, learning_rate: 1.0e-2}}
    generation: {{max_new_tokens: 4}}
    data:
      conversations:
        - - {{role: user, content: 微调测试}}
          - {{role: assistant, content: 我学会了}}
    expect:
      - {{prompt: 微调测试, {check}}}
"""


@dataclass
class CountTraining:
    trained: list[str] = field(default_factory=list)

    @hookimpl(tryfirst=True)
    def sft_spec_train(self, item, run, trainer):
        self.trained.append(item.name)


def outcomes(result) -> list[tuple[str, str]]:
    return [(c.nodeid, c.outcome) for r in result.recorder.reports for c in r.cases]


def test_unchanged_suite_is_not_trained_again(sft, write_spec, tmp_path):
    cache = tmp_path / "cache"
    folder = write_spec("a.sft.yaml", SPEC.format(method="lora", check="not_equals: 我学会了")).parent
    write_spec("b.sft.yaml", SPEC.format(method="full", check="equals: 我学会了"))  # fails: 2 epochs
    counter = CountTraining()
    first = sft("run", folder, "--cache-dir", cache, plugins=[counter])
    assert first.code == 1 and counter.trained == ["a", "b"]
    assert list(cache.glob("results/*/*/adapter/adapter_model.safetensors"))  # a's LoRA adapter is kept

    counter.trained.clear()
    second = sft("run", folder, "--cache-dir", cache, plugins=[counter])
    assert counter.trained == []
    assert outcomes(second) == outcomes(first) and second.code == first.code
    assert second.out.count("(cached)") == 2
    assert "result cache: 2 reused, 0 stored" in second.out
    assert [r.losses for r in second.recorder.reports] == [r.losses for r in first.recorder.reports]

    # A changed spec is trained again; the unchanged one is still reused.
    write_spec("b.sft.yaml", SPEC.format(method="full", check="not_equals: 我学会了"))
    third = sft("run", folder, "--cache-dir", cache, plugins=[counter])
    assert counter.trained == ["b"] and third.code == 0

    counter.trained.clear()
    sft("run", folder, "--cache-dir", cache, "--no-cache", plugins=[counter])
    assert counter.trained == ["a", "b"]


def test_damaged_entry_is_discarded_and_rebuilt(sft, write_spec, tmp_path):
    cache = tmp_path / "cache"
    path = write_spec("a.sft.yaml", SPEC.format(method="lora", check="not_equals: 我学会了"))
    counter = CountTraining()
    sft("run", path, "--cache-dir", cache, plugins=[counter])
    (entry,) = cache.glob("results/*/*/report.json")
    entry.write_text(entry.read_text(encoding="utf-8").replace('"passed"', '"failed"', 1), encoding="utf-8")
    again = sft("run", path, "--cache-dir", cache, plugins=[counter])
    assert counter.trained == ["a", "a"] and again.code == 0
    assert "discarded a damaged entry" in again.out
    assert len(list(cache.glob("results/*/*/report.json"))) == 1

    cleared = sft("cache", "clear", "--cache-dir", cache)
    assert cleared.code == 0 and "removed 1 cached results" in cleared.out
    assert not list(cache.glob("results/*/*/report.json"))


def test_update_flags_bypass_the_cache(sft, write_spec, tmp_path):
    cache = tmp_path / "cache"
    path = write_spec("s.sft.yaml", SPEC.format(method="lora", check="snapshot: true"))
    counter = CountTraining()
    sft("run", path, "--cache-dir", cache, "--update-snapshots", plugins=[counter])
    sft("run", path, "--cache-dir", cache, "--update-snapshots", plugins=[counter])
    assert counter.trained == ["s", "s"]


def test_deterministic_runs_repeat_and_say_what_it_costs(sft, write_spec):
    import torch

    path = write_spec("d.sft.yaml", SPEC.format(method="lora", check="not_equals: 我学会了"))
    first = sft("run", path, "--deterministic", "--no-cache")
    second = sft("run", path, "--deterministic", "--no-cache")
    assert first.recorder.reports[0].losses == second.recorder.reports[0].losses
    assert "deterministic: torch.use_deterministic_algorithms(True)" in first.out
    assert "training took" in first.out
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_a_result_passed_under_fallback_is_not_reused_under_on_unsupported_error(sft, write_spec, tmp_path):
    cache = tmp_path / "cache"
    spec = SPEC.format(method="lora", check="not_equals: 我学会了").replace("learning_rate: 1.0e-2", "fp16: true")
    path = write_spec("fp16.sft.yaml", spec)
    counter = CountTraining()
    fell_back = sft("run", path, "--cache-dir", cache, plugins=[counter])
    assert fell_back.code == 0 and counter.trained == ["fp16"]
    strict = sft("run", path, "--cache-dir", cache, "--on-unsupported", "error", plugins=[counter])
    assert strict.code == 1 and "(cached)" not in strict.out
    assert "fp16 needs a GPU; pass --on-unsupported=fallback" in strict.out


def test_the_key_knows_which_training_checks_were_selected(sft, write_spec, tmp_path):
    """Before, ``run -k expect`` stored a report without the training checks and a plain ``run`` reused it:
    the spec's checks[loss_decreased] silently disappeared."""
    cache = tmp_path / "cache"
    path = write_spec("k.sft.yaml", SPEC.format(method="lora", check="not_equals: 我学会了")
                      + "    checks: {loss_decreased: true}\n")
    only_expect = sft("run", path, "--cache-dir", cache, "-k", "expect")
    assert [c.nodeid.rsplit("::", 1)[1] for c in only_expect.recorder.reports[0].cases] == ["expect[0]"]
    everything = sft("run", path, "--cache-dir", cache)
    assert [c.nodeid.rsplit("::", 1)[1] for c in everything.recorder.reports[0].cases] == [
        "expect[0]", "checks[loss_decreased]"]
    assert "(cached)" not in everything.out


CANNED = """\
from sft_spec import hookimpl
from sft_spec.state import Answer


@hookimpl(tryfirst=True)
def sft_spec_generate(item, run, prompts, when):
    return [Answer(text={answer!r}, raw={answer!r}) for _ in prompts] if when == "after" else None
"""


def test_an_edited_plugin_invalidates_the_cached_results(sft, write_spec, tmp_path, monkeypatch):
    from conftest import GEMMA_ONE_ANSWER

    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = tmp_path / "canned.py"
    plugin.write_text(CANNED.format(answer="zz"), encoding="utf-8")
    path = write_spec("c.sft.yaml", GEMMA_ONE_ANSWER.format(method="lora", epochs=1, lr=1e-3))
    first = sft("run", path, "-p", "canned").recorder.reports[0]
    import importlib
    import sys

    plugin.write_text(CANNED.format(answer="我学会了"), encoding="utf-8")
    sys.modules.pop("canned", None)
    importlib.invalidate_caches()
    second = sft("run", path, "-p", "canned").recorder.reports[0]
    assert first.outcome == "failed" and not second.cached and second.outcome == "passed"


def test_the_reports_name_the_adapter_where_the_cache_keeps_it(tmp_path, monkeypatch, sft, write_spec,
                                                                 one_answer_spec):
    import json
    from pathlib import Path

    monkeypatch.setenv("SFT_SPEC_CACHE", str(tmp_path / "cache"))
    spec = write_spec("a.sft.yaml", one_answer_spec(method="lora", epochs=2))
    sft("run", spec, "--json", tmp_path / "r.json")
    named = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["specs"][0]["extra"]["cached_adapter"]
    assert Path(named).is_dir() and Path(named).is_relative_to(tmp_path / "cache"), named


class JudgeOption(CountTraining):
    """A plugin whose option decides results (a judge model, say): it says so through sft_spec_cache_key."""

    judge = "small"

    @hookimpl
    def sft_spec_cache_key(self, item, config):
        return {"judge": self.judge}


def test_a_plugins_own_input_is_in_the_key(sft, write_spec, tmp_path):
    # The key held the options the result cache knew by name, read from other plugins' options: a
    # plugin had no way to say that its own setting decides a result.
    cache = tmp_path / "cache"
    path = write_spec("j.sft.yaml", SPEC.format(method="lora", check="not_equals: 我学会了"))
    plugin = JudgeOption()
    sft("run", path, "--cache-dir", cache, plugins=[plugin])
    sft("run", path, "--cache-dir", cache, plugins=[plugin])
    assert plugin.trained == ["j"]  # unchanged: reused
    plugin.judge = "large"
    sft("run", path, "--cache-dir", cache, plugins=[plugin])
    assert plugin.trained == ["j", "j"]  # the plugin's input changed: trained again


def test_every_built_in_input_comes_from_its_owner():
    # Each plugin says what of it decides a result; the result cache only hashes.
    import ast
    from pathlib import Path

    import sft_spec_plugins.run.result_cache as result_cache

    source = Path(result_cache.__file__).read_text(encoding="utf-8")
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)]
    options = [call.args[0].value for call in calls if getattr(call.func, "attr", "") == "getoption"
               and call.args and isinstance(call.args[0], ast.Constant)]
    assert set(options) <= {"no_cache", "collect_only", "update_snapshots", "update_baselines"}, options


@pytest.mark.parametrize("option", [["--deterministic"], ["--stop-when-learnt"], ["--allow-pickle"],
                                    ["--allow-remote-code"], ["--on-unsupported", "error"], ["--device", "cuda"]])
def test_every_option_that_decides_a_result_changes_the_key(write_spec, option):
    from conftest import load_context

    from sft_spec.bootstrap import prepare_config
    from sft_spec.loading import LoadContext, load_spec_file
    from sft_spec_plugins.run.result_cache import cache_key

    path = write_spec("k.sft.yaml", SPEC.format(method="lora", check="not_equals: 我学会了"))
    item = load_spec_file(path, load_context(path.parent))[0]
    plain = cache_key(item, prepare_config(["run", str(path)], output_dir=path.parent).config)
    changed = LoadContext(prepare_config(["run", str(path), *option], output_dir=path.parent).config)
    assert cache_key(item, changed.config) != plain


@pytest.mark.parametrize("edit", ["data", "snapshot"])
def test_the_files_a_spec_reads_change_the_key(write_spec, edit):
    from conftest import load_context

    from sft_spec.bootstrap import prepare_config
    from sft_spec.loading import load_spec_file
    from sft_spec_plugins.common.recorded import recorded_path
    from sft_spec_plugins.run.result_cache import cache_key

    folder = write_spec("data.jsonl", '{"messages": [{"role": "user", "content": "a"}, '
                        '{"role": "assistant", "content": "b"}]}\n').parent
    path = write_spec("f.sft.yaml", "model: builtin:tiny-gemma\ndata:\n  files:\n    - path: data.jsonl\n"
                      "expect:\n  - {prompt: a, equals: b}\n")
    config = prepare_config(["run", str(path)], output_dir=folder).config
    before = cache_key(load_spec_file(path, load_context(folder))[0], config)
    if edit == "data":  # the same conversations, other bytes (a reader may skip what the key never saw)
        (folder / "data.jsonl").write_text((folder / "data.jsonl").read_text() + "\n", encoding="utf-8")
    else:
        snapshot = recorded_path(path, "__snapshots__")
        snapshot.parent.mkdir()
        snapshot.write_text("expect[0]: b\n", encoding="utf-8")
    assert cache_key(load_spec_file(path, load_context(folder))[0], config) != before


class SameName:
    """A plugin whose input has a name a built-in uses too."""

    model = "judge-a"

    @hookimpl
    def sft_spec_cache_key(self, item, config):
        return {"model": self.model}


def test_two_plugins_naming_an_input_alike_both_count(write_spec):
    from conftest import load_context

    from sft_spec.bootstrap import prepare_config
    from sft_spec.loading import load_spec_file
    from sft_spec_plugins.run.result_cache import cache_key

    path = write_spec("n.sft.yaml", SPEC.format(method="lora", check="not_equals: 我学会了"))
    plugin = SameName()
    config = prepare_config(["run", str(path)], plugins=[plugin], output_dir=path.parent).config
    item = load_spec_file(path, load_context(path.parent, plugins=[plugin]))[0]
    first = cache_key(item, config)
    plugin.model = "judge-b"
    assert cache_key(item, config) != first  # the built-in "model" no longer overwrites it
