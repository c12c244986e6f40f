"""The documentation cannot drift from the code: the spec reference is generated, every hook is
documented with its real signature, the plugin walkthrough quotes the example package verbatim, every
spec shown in README.md and docs/ validates (marked ones run), and every `sft-spec COMMAND` exists."""

from __future__ import annotations

import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- docs/spec-reference.md --------------------------------------------------------------------------


def test_spec_reference_is_generated_from_the_code():
    generated = load_generator().render_reference()
    committed = (DOCS / "spec-reference.md").read_text(encoding="utf-8")
    assert committed == generated, "docs/spec-reference.md is stale: run `python docs/generate.py`"


def test_a_section_written_as_a_mapping_of_names_documents_its_entries_keys():
    # eval: {golden: {path: ..., checks: ...}} showed one empty `eval.root` row, and no key of an eval set.
    reference = load_generator().render_reference()
    assert "`eval.root`" not in reference
    for key in ("path", "prompt", "reference", "id", "checks", "pass_rate", "mean", "change", "xfail"):
        assert f"| `eval.<name>.{key}` |" in reference, key
    assert "| `eval.<name>.pass_rate.confidence` |" in reference


def test_spec_reference_follows_field_descriptions(monkeypatch):
    from sft_spec_plugins.check.generation import GenerationSpec

    field = GenerationSpec.model_fields["max_new_tokens"]
    monkeypatch.setattr(field, "description", "A description only this test writes")
    text = load_generator().render_reference()
    assert "| `generation.max_new_tokens` | integer (> 0) | `32` | A description only this test writes |" in text


def test_spec_reference_lists_every_key_and_check():
    from sft_spec.pluginmanager import build_registry
    from sft_spec.spec import Spec

    generator = load_generator()
    text = generator.render_reference()
    for name in Spec.model_fields:
        assert f"| `{name}` |" in text
    nested = dict(generator.nested_models(Spec))
    assert {"model", "matrix[]"} <= set(nested)
    registry = build_registry(generator.own_plugin_manager())
    sections = {name: section.model for name, section in registry.sections.items()}
    assert {"data", "format", "generation", "launcher"} <= set(sections)  # plugins' own top-level keys
    sections.update(generator.nested_models(sections["data"], "data."))
    assert {"data.files[]", "data.conversations[][]"} <= set(sections)
    for path, model in [*nested.items(), *sections.items()]:
        entry = generator.mapping_of(model)  # eval: {name: entry}: the entry's keys, under eval.<name>.
        model, path = (entry, f"{path}.<name>") if entry is not None else (model, path)
        for name in model.model_fields:
            assert f"| `{path}.{name}` |" in text
    for name in registry.checks:
        assert f"| `{name}` |" in text
    assert "| `max_seq_length` | `max_length` |" in text
    assert "| `output_dir` |" in text and "| `task_type` |" in text
    from sft_spec_plugins.train import recipe_policy

    for name in [*recipe_policy.TRAINING, *recipe_policy.LORA]:  # every classified field is on the page
        assert f"`{name}`" in text, name


# -- docs/hooks.md -----------------------------------------------------------------------------------


def hook_doc_problems(text: str) -> list[str]:
    """What docs/hooks.md gets wrong about src/sft_spec/hookspecs.py: missing, extra, or different hooks."""
    generator = load_generator()
    specs = {fn.__name__: fn for fn in generator.hookspec_functions()}
    problems = []
    documented: dict[str, tuple[list[str], str | None]] = {}
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for section in sections:
        heading = section.splitlines()[0]
        match = re.fullmatch(r"(sft_spec_\w+)\(([^)]*)\)", heading.strip())
        if not match:
            continue
        args = [a.strip() for a in match.group(2).split(",") if a.strip()]
        first = re.search(r"^firstresult: (yes|no)$", section, re.M)
        documented[match.group(1)] = (args, first.group(1) if first else None)
    for name, fn in specs.items():
        if name not in documented:
            problems.append(f"{name} is not documented (python docs/generate.py --hooks-skeleton)")
            continue
        args, first = documented[name]
        real = list(inspect.signature(fn).parameters)
        if args != real:
            problems.append(f"{name}: documented as ({', '.join(args)}), the hookspec is ({', '.join(real)})")
        expected = "yes" if fn.sft_spec_spec.get("firstresult") else "no"
        if first != expected:
            problems.append(f"{name}: documented firstresult: {first}, the hookspec says {expected}")
    problems += [f"{name} is documented but is no hook" for name in documented if name not in specs]
    return problems


def test_every_hook_is_documented_with_its_signature():
    problems = hook_doc_problems((DOCS / "hooks.md").read_text(encoding="utf-8"))
    assert not problems, "docs/hooks.md is out of date:\n" + "\n".join(problems)


def test_the_hook_check_catches_wrong_docs():
    text = (DOCS / "hooks.md").read_text(encoding="utf-8")
    wrong = text.replace("## sft_spec_train(item, run, trainer)", "## sft_spec_train(item, trainer)")
    wrong = wrong.replace("## sft_spec_log_report(report, session)\n\nfirstresult: no",
                          "## sft_spec_log_report(report, session)\n\nfirstresult: yes")
    wrong = re.sub(r"## sft_spec_session_start\(session\)", "## Session start", wrong)
    problems = hook_doc_problems(wrong + "\n## sft_spec_no_such_hook(x)\n\nfirstresult: no\n")
    assert any(p.startswith("sft_spec_train: documented as (item, trainer)") for p in problems)
    assert any(p.startswith("sft_spec_log_report: documented firstresult: yes") for p in problems)
    assert any(p.startswith("sft_spec_session_start is not documented") for p in problems)
    assert "sft_spec_no_such_hook is documented but is no hook" in problems


def test_the_hooks_skeleton_covers_missing_hooks():
    skeleton = load_generator().hooks_skeleton("## sft_spec_addoption(parser)\n")
    assert "## sft_spec_addoption(" not in skeleton
    assert "## sft_spec_load_model(item, config)\n\nfirstresult: yes" in skeleton


# -- docs/writing-plugins.md quotes the example package ----------------------------------------------


def test_the_plugin_walkthrough_quotes_the_example_files():
    generator = load_generator()
    text = (DOCS / "writing-plugins.md").read_text(encoding="utf-8")
    assert {m.group(2) for m in generator.QUOTE.finditer(text)} == {
        "examples/plugins/sft-spec-max-chars/pyproject.toml",
        "examples/plugins/sft-spec-max-chars/src/sft_spec_max_chars/__init__.py",
        "examples/plugins/sft-spec-max-chars/tests/test_max_chars.py",
    }
    assert text == generator.refresh_quotes(text), (
        "docs/writing-plugins.md quotes example files that changed: run `python docs/generate.py`")


def test_a_changed_example_file_is_caught():
    generator = load_generator()
    text = (DOCS / "writing-plugins.md").read_text(encoding="utf-8")
    edited = text.replace("def max_chars(answer", "def max_characters(answer", 1)
    assert edited != text
    assert generator.refresh_quotes(edited) == text


# -- every spec in the docs validates ----------------------------------------------------------------


@dataclass
class Block:
    page: Path
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"


def fenced_blocks(page: Path, languages: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """(line, text, the line before the fence) of each fenced block in one of ``languages``."""
    lines = page.read_text(encoding="utf-8").splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if match:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if match.group(1) in languages:
                out.append((i + 2, "".join(lines[i + 1:end]), lines[i - 1] if i else ""))
            i = end
        i += 1
    return out


def spec_blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        for line, text, _ in fenced_blocks(page, ("yaml", "yml")):
            data = yaml.safe_load(text)
            if isinstance(data, dict) and "model" in data and "data" in data:
                blocks.append(Block(page, line, text))
    return blocks


def data_files(page: Path) -> dict[str, str]:
    """Files a page shows for its specs: a block right after ``<!-- sft-spec: data-file PATH -->``."""
    out = {}
    for _, text, before in fenced_blocks(page, ("json", "jsonl", "jinja", "text", "")):
        match = re.match(r"<!-- sft-spec: data-file (\S+) -->", before)
        if match:
            out[match.group(1)] = text
    return out


SPEC_BLOCKS = spec_blocks()


def test_the_docs_show_specs():
    pages = {b.page.name for b in SPEC_BLOCKS}
    assert {"README.md", "recipes.md", "writing-plugins.md"} <= pages
    assert sum(b.page.name == "recipes.md" for b in SPEC_BLOCKS) >= 6
    assert any("# sft-spec: run" in b.text for b in SPEC_BLOCKS)


@pytest.mark.parametrize("block", SPEC_BLOCKS, ids=lambda b: b.id)
def test_doc_spec_validates(block: Block, tmp_path, monkeypatch, capsys):
    if "# sft-spec: skip-validate" in block.text:
        pytest.skip(block.text.split("# sft-spec: skip-validate", 1)[1].splitlines()[0].strip(" ()")
                    or "marked skip-validate")
    from sft_spec.cli import main

    # Examples may use the repo's sample data (specs/data/) and files the page itself shows.
    shutil.copytree(REPO / "specs" / "data", tmp_path / "data")
    for relative, text in data_files(block.page).items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text, encoding="utf-8")
    path = tmp_path / "example.sft.yaml"
    path.write_text(block.text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    command = "run" if "# sft-spec: run" in block.text else "validate"
    code = main([command, str(path)])
    out = capsys.readouterr()
    assert code == 0, f"{block.id}: `sft-spec {command}` failed:\n{out.out}\n{out.err}"


# -- every `sft-spec COMMAND` in the docs exists -----------------------------------------------------


def subcommands() -> set[str]:
    help_text = subprocess.run([sys.executable, "-m", "sft_spec", "--help"], capture_output=True, text=True,
                               check=True).stdout
    listing = help_text.split("COMMAND\n", 2)[-1].split("\noptions:")[0]
    return set(re.findall(r"^    ([a-z][\w-]*)\s", listing, re.M))


COMMAND = re.compile(r"(?:^|[\s/&;(=])sft-spec ((?:-\S+ )*)([a-z][\w-]*)")


def mentioned_commands(text: str) -> set[str]:
    """``sft-spec WORD`` in inline code, and in shell lines of code blocks (where a line starts the
    command, after ``$``, ``&&`` or variable settings); prose and program output are no commands."""
    snippets = []
    prose = []
    for part_index, part in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if part_index % 2:  # inside a fenced block
            snippets += re.findall(r"(?:^|&& |; )(?:\$ )?(?:\w+=\S* )*(?:\S*/)?(sft-spec .*)$", part, re.M)
        else:
            prose.append(part)
    snippets += re.findall(r"`([^`\n]*)`", "".join(prose))
    return {m.group(2) for snippet in snippets for m in COMMAND.finditer(snippet)}


def test_every_command_in_the_docs_exists():
    real = subcommands()
    assert {"run", "validate", "plugins"} <= real
    for page in PAGES:
        unknown = mentioned_commands(page.read_text(encoding="utf-8")) - real
        assert not unknown, f"{page.name} mentions sft-spec commands that do not exist: {sorted(unknown)}"


def test_the_command_check_sees_commands():
    text = "run `sft-spec frobnicate specs/` then\n```bash\n$ sft-spec run -v\nX=1 .venv/bin/sft-spec -q lint\n```\n"
    assert mentioned_commands(text) == {"frobnicate", "run", "lint"}
    output = "```\n===== sft-spec session starts =====\n```\nsft-spec trains the model\n"
    assert mentioned_commands(output) == set()


def test_the_command_table_lists_every_command():
    # It listed 3 of 9 commands once, and 5 of 11 before this test.
    from sft_spec.bootstrap import make_parser
    from sft_spec.pluginmanager import make_plugin_manager

    commands = make_parser(make_plugin_manager())._subparsers._group_actions[0].choices
    usage = (DOCS / "usage.md").read_text(encoding="utf-8")
    table = usage.split("## Command line", 1)[1].split("\n\n", 2)[1]
    for name in commands:
        assert f"| `sft-spec {name}" in table, name
