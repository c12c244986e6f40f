"""Projects for the pytest plugin's tests: a folder with a pytest config, a spec that trains and one that is
skipped, and pytest run on it in a process of its own (as a user runs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SPEC = """\
    tags: [smoke]
    model: builtin:tiny-gemma
    method: lora
    lora: {r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}
    training: {num_train_epochs: 3, learning_rate: 1.0e-2, per_device_train_batch_size: 8}
    data:
      conversations:
        - - {role: user, content: 微调测试}
          - {role: assistant, content: 我学会了}
    expect:
      - prompt: 微调测试
        not_contains: zzz
      - prompt: 微调测试
        equals: 我学会了吗
    checks:
      loss_decreased: true
"""

SKIPPED = """\
    skip: not today
    model: builtin:tiny-gemma
    data:
      conversations:
        - - {role: user, content: a}
          - {role: assistant, content: b}
    expect:
      - prompt: a
        equals: b
"""

BOOM_PLUGIN = """\
from sft_spec import hookimpl


@hookimpl(tryfirst=True)
def sft_spec_load_model(item, config):
    if item.name == "boom":
        raise RuntimeError("the model loader exploded")
"""


def make_project(tmp_path: Path) -> Path:
    """A project folder with a pytest config at its root, so pytest's ids start at the same folder."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "learn.sft.yaml").write_text(textwrap.dedent(SPEC), encoding="utf-8")
    (specs / "later.sft.yaml").write_text(textwrap.dedent(SKIPPED), encoding="utf-8")
    return tmp_path


def run_pytest(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "sft_spec", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def verbose_outcomes(output: str) -> dict[str, str]:
    found = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", output, re.M)
    return dict(found)
