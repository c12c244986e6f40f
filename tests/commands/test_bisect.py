"""``sft-spec bisect``: the first release that breaks a spec, found in throwaway environments built from a
local index of wheels, without touching this environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

PLUGIN = '''\
from sft_spec import hookimpl
from sft_spec.registry import Check, CheckResult

VERSION = {version!r}


def demo_ok(answer, argument, ctx):
    broken = tuple(map(int, VERSION.split("."))) >= (1, 1)  # the release that broke it, and every later one
    return CheckResult(not broken, f"sft-spec-bisect-demo {{VERSION}}: " + ("broken" if broken else "fine"))


@hookimpl
def sft_spec_register_checks(register):
    register(Check("demo_ok", demo_ok, "true: passes before release 1.1", lambda value: None))
'''
PYPROJECT = '''\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "sft-spec-bisect-demo"
version = "{version}"

[project.entry-points.sft_spec]
bisect_demo = "sft_spec_bisect_demo"
'''
SPEC = """\
model: builtin:tiny-gemma
training: {num_train_epochs: 1, learning_rate: 1.0e-3}
generation: {max_new_tokens: 2}
data:
  conversations:
    - - {role: user, content: a}
      - {role: assistant, content: b}
expect:
  - {prompt: a, demo_ok: true}
"""


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """Three releases of a plugin whose check breaks at 1.1, built offline into a folder (a local index)."""
    root = tmp_path_factory.mktemp("bisect")
    out = root / "wheels"
    for version in ("1.0", "1.1", "1.2", "1.3"):
        source = root / f"src-{version}"
        (source / "sft_spec_bisect_demo").mkdir(parents=True)
        (source / "sft_spec_bisect_demo" / "__init__.py").write_text(PLUGIN.format(version=version))
        (source / "pyproject.toml").write_text(PYPROJECT.format(version=version))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (root / "demo.sft.yaml").write_text(textwrap.dedent(SPEC), encoding="utf-8")
    return root


@pytest.mark.slow
def test_bisect_finds_the_first_release_that_breaks_the_spec_and_leaves_this_environment_alone(wheels, sft):
    before = sorted(d.metadata["Name"] for d in metadata.distributions())
    result = sft("bisect", wheels / "demo.sft.yaml", "--package", "sft-spec-bisect-demo", "--good", "1.0",
                 "--bad", "1.3", "--no-index", "--find-links", wheels / "wheels", "--cache-dir", wheels / "cache")
    assert result.code == 0, result.out + result.err
    assert "first bad release: sft-spec-bisect-demo 1.1 (failed; the release before, 1.0, passed)" in result.out
    assert "sft-spec-bisect-demo 1.1: broken" in result.out  # the evidence: the check's own message
    assert sorted(d.metadata["Name"] for d in metadata.distributions()) == before  # nothing installed here
    assert "sft-spec-bisect-demo" not in before
    # Both ends, then the middle: 1.2 was never needed, so never installed.
    environments = sorted(p.name for p in (wheels / "cache" / "bisect").iterdir())
    assert environments == [f"sft-spec-bisect-demo-{v}" for v in ("1.0", "1.1", "1.3")]


def test_bisect_refuses_when_the_index_has_nothing_between_the_two(wheels, sft):
    result = sft("bisect", wheels / "demo.sft.yaml", "--package", "sft-spec-bisect-demo", "--good", "1.0",
                 "--bad", "1.1", "--no-index", "--find-links", wheels / "wheels", "--cache-dir", wheels / "cache")
    assert result.code == 4 and "has no release of sft-spec-bisect-demo between 1.0 and 1.1" in result.err
    missing = sft("bisect", wheels / "demo.sft.yaml", "--package", "no-such-package-xyz", "--good", "1.0",
                  "--bad", "2.0", "--no-index", "--find-links", wheels / "wheels")
    assert missing.code == 4 and "has no release of 'no-such-package-xyz'" in missing.err
    unknown = sft("bisect", wheels / "demo.sft.yaml", "--package", "sft-spec-bisect-demo")
    assert unknown.code == 4 and "Give --good and --bad" in unknown.err
    assert Path(wheels / "wheels").is_dir()
