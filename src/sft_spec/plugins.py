"""The plugin manager: built-in and outside plugins come from one entry-point group, ``sft_spec``.

A plugin that fails to import is reported and left out (tox-style) instead of crashing the run; a
missing built-in is an error that says how to repair the install.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import import_module, metadata
from typing import Any

import pluggy

from . import hookspecs
from .registry import Check, Registry

ENTRY_POINT_GROUP = "sft_spec"
#: Built-in plugins a run cannot do without.
ESSENTIAL_PLUGINS = ("models", "formatters", "collators", "trainer", "generation", "checks", "terminal")


@dataclass
class PluginProblem:
    name: str
    message: str


@dataclass
class PluginInfo:
    name: str
    module: str
    version: str
    hooks: list[str] = field(default_factory=list)


def make_plugin_manager(extra_plugins: list[Any] | None = None, disabled: set[str] | None = None,
                        problems: list[PluginProblem] | None = None) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("sft_spec")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("SFT_SPEC_TRACE"):
        # Every hook call, its arguments and results, on stderr.
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    from . import runner, session

    pm.register(session, name="sft_spec.session")
    pm.register(runner, name="sft_spec.runner")
    disabled = disabled or set()
    problems = problems if problems is not None else []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the run down
            problems.append(PluginProblem(ep.name, f"{type(exc).__name__}: {exc}"))
    for plugin in extra_plugins or []:
        if isinstance(plugin, str):
            try:
                plugin = import_module(plugin)
            except ImportError as exc:
                problems.append(PluginProblem(plugin, f"cannot import: {exc}"))
                continue
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name if pm.get_plugin(name) is None else None)
    for name in ESSENTIAL_PLUGINS:
        if name not in disabled and pm.get_plugin(name) is None and not any(p.name == name for p in problems):
            problems.append(PluginProblem(name, "built-in plugin is not installed: reinstall sft-spec"))
    return pm


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Ask every plugin to register its named things; earlier callers win, built-ins (trylast) come last."""
    registry = Registry()
    for hook_name, add in (
        ("sft_spec_register_formatters", registry.register_formatter),
        ("sft_spec_register_collators", registry.register_collator),
        ("sft_spec_register_model_loaders", registry.register_model_loader),
    ):
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
            def register(name, obj, description="", _add=add, _plugin=impl.plugin_name):
                _add(name, obj, description=description, plugin=_plugin)

            impl.function(register=register)
    for impl in reversed(pm.hook.sft_spec_register_checks.get_hookimpls()):
        def register_check(check: Check, _plugin=impl.plugin_name) -> None:
            registry.register_check(check)

        impl.function(register=register_check)
    return registry


def plugin_infos(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every registered plugin with its distribution version and the hooks it implements."""
    dists = {}
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                dists[ep.name] = dist.version
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        module = getattr(plugin, "__name__", type(plugin).__module__)
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        version = dists.get(name) or (metadata.version("sft-spec") if module.startswith("sft_spec") else "")
        infos.append(PluginInfo(name, module, version, hooks))
    return infos


def plugin_name_for_traceback(pm: pluggy.PluginManager, tb) -> str:
    """The plugin whose code raised: the innermost traceback frame in a plugin module or plugin object."""
    modules, objects = {}, {}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        if hasattr(plugin, "__file__"):
            modules[plugin.__name__] = name
        else:
            objects[id(plugin)] = name
    found = ""
    while tb is not None:
        frame = tb.tb_frame
        owner = objects.get(id(frame.f_locals.get("self")))
        module = modules.get(frame.f_globals.get("__name__", ""))
        found = owner or module or found
        tb = tb.tb_next
    return found
