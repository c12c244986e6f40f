"""Nothing a spec, its data or a model writes can forge what a reviewer reads: control characters reach the
terminal, the HTML and the JUnit XML escaped (``\\x1b``), never obeyed."""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft_spec.cli import main
from sft_spec_plugins.common.escape import safe
from sft_spec_plugins.report.json_report import load_document

#: What a hostile name does to a CI log: erase the line, return to its start and print a verdict.
FORGERY = "\x1b[2K\r\x1b[32m12 passed\x1b[0m"

# YAML's double-quoted escapes (\e, \r, \0) put the raw characters into the loaded strings.
HOSTILE = r'''
    name: "evil\e[2K\r\e[32m12 passed\e[0m"
    model: builtin:tiny-gemma
    method: full
    training: {num_train_epochs: 1, learning_rate: 1.0e-4}
    data:
      conversations:
        - - {role: user, content: "q\0\e[1A"}
          - {role: assistant, content: "a\0\e]8;;http://x\a"}
    expect:
      - prompt: "q\0\e[1A"
        equals: "a\0\e]8;;http://x\a\u202e"
'''

BAD_KEY = r'''
    model: builtin:tiny-gemma
    "trai\e[2K\rning": {}
    data:
      conversations:
        - - {role: user, content: hi}
          - {role: assistant, content: ho}
'''

#: The raw control characters and text-reordering format characters that must never be written out.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forged")
    for name, text in (("evil", HOSTILE), ("badkey", BAD_KEY)):
        (folder / f"{name}.sft.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    out = folder / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", str(folder), "-v", "--tb=long", "--no-cache", "--junitxml", str(out / "junit.xml"),
                     "--html", str(out / "report.html"), "--json", str(out / "results.json")])
    return {"code": code, "stdout": stdout.getvalue(), "out": out}


def test_the_terminal_shows_control_characters_escaped(forged):
    text = forged["stdout"]
    assert forged["code"] == 1
    assert not RAW.findall(text), sorted(set(RAW.findall(text)))
    assert FORGERY not in text
    assert r"evil\x1b[2K\r\x1b[32m12 passed\x1b[0m" in text  # the name, readable as what it is
    assert r"a\x00\x1b]8;;http://x\x07" in text  # the expected answer in the failure
    assert r"trai\x1b[2K\rning" in text  # the error message's key


def test_html_and_junit_show_control_characters_escaped(forged):
    html = (forged["out"] / "report.html").read_text(encoding="utf-8")
    assert not RAW.findall(html), sorted(set(RAW.findall(html)))
    assert r"evil\x1b[2K\r\x1b[32m12 passed\x1b[0m" in html and r"\u202e" in html
    junit = (forged["out"] / "junit.xml").read_text(encoding="utf-8")
    assert not RAW.findall(junit)
    ET.fromstring(junit)  # XML 1.0 cannot hold most control characters at all
    assert r"\x1b[2K" in junit


def test_json_keeps_the_exact_text(forged):
    # JSON escapes control characters itself; the machine-readable report keeps the name as written.
    _, reports = load_document(forged["out"] / "results.json")
    assert any(r.name == "evil" + FORGERY for r in reports)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_safe_text_holds_no_control_character_and_keeps_every_other(text):
    shown = safe(text)
    assert not RAW.search(shown) and "\n" not in shown
    if not re.search("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]", text):
        assert shown == text  # printable text, Chinese included, is left as it is
