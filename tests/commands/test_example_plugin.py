"""The plugin of docs/writing-plugins.md works as a real, installed package: pip installs
examples/plugins/sft-spec-max-chars into a temporary folder (not into the shared environment, where its
``max_chars`` check would change what other tests see), then its own tests run against that install,
and ``sft-spec plugins`` lists it with its version."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "plugins" / "sft-spec-max-chars"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(a copy of the example's folder, an environment whose import path holds the installed package)."""
    root = tmp_path_factory.mktemp("example-plugin")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = root / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"pip could not install the example plugin offline: {result.stderr.strip()[-500:]}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return source, env


def test_the_install_is_a_real_distribution_with_an_entry_point(installed):
    source, env = installed
    code = ("from importlib import metadata; d = metadata.distribution('sft-spec-max-chars'); "
            "print(d.version, [(e.group, e.name, e.value) for e in d.entry_points])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0.1.0 [('sft_spec', 'max_chars', 'sft_spec_max_chars')]"


def test_sft_spec_plugins_lists_it_with_its_version(installed):
    _, env = installed
    result = subprocess.run([sys.executable, "-m", "sft_spec", "plugins"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    at = lines.index("max_chars 0.1.0  (sft_spec_max_chars)")
    # Its hooks, and what it registered under them, named as its own.
    assert lines[at + 1:at + 4] == ["    hooks: sft_spec_register_checks, sft_spec_register_formatters",
                                    "    formatters: plain", "    checks: max_chars"]
    # The plugin guide shows this output as it is.
    guide = (REPO / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    shown = guide.split("<!-- output: sft-spec plugins", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    assert shown.splitlines() == lines[at:at + 4]


def test_the_example_plugins_own_tests_pass(installed):
    source, env = installed
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=source, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout
