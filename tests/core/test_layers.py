"""The layering written down: the core never imports the plugins, no modules import each other in a
cycle, a phase package imports only the phases below it (import-linter's contracts in pyproject.toml),
and plugins use only the core's public names and no other plugin's private ones."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN_SOURCES = (sorted((REPO / "src" / "sft_spec_plugins").rglob("*.py"))
                  + sorted((REPO / "examples" / "plugins").rglob("*.py")))


def test_the_import_contracts_hold(capsys):
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    os.chdir(REPO)  # the contracts live in pyproject.toml
    try:
        code = lint_imports(no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count(" KEPT") == 5, out  # every contract was checked, not skipped


#: The core's public modules: state and registry types, reports, errors, the spec model and loading helpers,
#: and (for plugins that start processes or sessions of their own) the bootstrap, the session and the CLI.
PUBLIC_MODULES = ("sft_spec", "sft_spec.state", "sft_spec.registry", "sft_spec.reports", "sft_spec.errors",
                  "sft_spec.spec", "sft_spec.config", "sft_spec.loading", "sft_spec.loading.paths",
                  "sft_spec.loading.data", "sft_spec.loading.expectations", "sft_spec.loading.wording",
                  "sft_spec.bootstrap", "sft_spec.session", "sft_spec.pluginmanager", "sft_spec.cli")


def private_uses(source: str) -> list[str]:
    """Modules outside ``PUBLIC_MODULES``, and ``_names``, that ``source`` takes from the core."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:  # another plugin's private name, imported relatively
            found += [f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names
                      if a.name.startswith("_") and a.name != "__version__"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sft_spec_plugins":
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sft_spec":
            module = node.module or ""
            found += [f"{module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            found += [module] if module not in PUBLIC_MODULES else []
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "sft_spec" and a.name not in PUBLIC_MODULES]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id == "sft_spec":
                found.append(ast.unparse(node))
    return found


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_use_only_the_cores_public_names(path):
    assert private_uses(path.read_text(encoding="utf-8")) == []


def test_the_check_sees_private_uses():
    source = ("from sft_spec.runner import _new_report\nimport sft_spec._private\nfrom sft_spec.loading.build "
              "import build_item\nimport sft_spec\nsft_spec.bootstrap._Parser\nfrom sft_spec import __version__\n"
              "from .workers import WorkerSetup, _worker_session\n"
              "from sft_spec_plugins.report.html_report import _shown\n")
    assert private_uses(source) == ["sft_spec.runner._new_report", "sft_spec.runner", "sft_spec._private",
                                    "sft_spec.loading.build", ".workers._worker_session",
                                    "sft_spec_plugins.report.html_report._shown",
                                    "sft_spec.bootstrap._Parser"]


def test_the_core_imports_no_training_library_even_lazily():
    # The core is guarded by what it may import (the contracts in pyproject.toml, run above), not by a line
    # count: this checks the contract itself would catch a lazy import inside a function.
    import grimp

    graph = grimp.build_graph("sft_spec", include_external_packages=True, cache_dir=None)
    imported = {m.split(".")[0] for module in graph.modules if module.startswith("sft_spec")
                for m in graph.find_modules_directly_imported_by(module)}
    assert not imported & {"torch", "transformers", "trl", "peft", "datasets", "numpy", "scipy"}, imported
