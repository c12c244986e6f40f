"""The plugin manager: built-in and outside plugins come from one entry-point group, ``sft_spec``.

A plugin that fails to import (any exception, a syntax error included) or implements a hook that does
not exist (a typo: ``check_pending``) is reported as broken and left out, tox-style, and the run goes
on; a missing or disabled essential built-in is an error that says how to repair the install.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from difflib import get_close_matches
from importlib import import_module, metadata
from typing import Any

import pluggy

from . import hookspecs
from .registry import Registry

ENTRY_POINT_GROUP = "sft_spec"
#: Built-in plugins a run cannot do without.
ESSENTIAL_PLUGINS = ("protocol", "models", "formatters", "collators", "trainer", "generation", "checks", "terminal")


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


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, problems: list[PluginProblem]) -> None:
    """Register one plugin; a misspelled hook unregisters it and names the plugin and the hook."""
    try:
        pm.register(plugin, name=name)
    except ValueError as exc:  # pluggy: this object, or another under this name, is registered already
        problems.append(PluginProblem(name, f"not registered: {exc}"))
        return
    except pluggy.PluginValidationError as exc:  # a hookimpl whose signature does not fit its spec
        problems.append(PluginProblem(name, str(exc)))
        return
    known = [n for n in dir(pm.hook) if n.startswith("sft_spec_")]
    unknown = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.spec is None:
            close = get_close_matches(caller.name, known, n=1)
            unknown.append(f"{caller.name}" + (f" (did you mean {close[0]}?)" if close else ""))
    if unknown:
        pm.unregister(plugin)
        problems.append(PluginProblem(name, f"implements no such hook: {', '.join(unknown)}"))


def make_plugin_manager(extra_plugins: list[Any] | None = None, disabled: set[str] | None = None,
                        problems: list[PluginProblem] | None = None) -> pluggy.PluginManager:
    """Entry-point plugins, then ``-p`` modules and plugin objects; broken ones go to ``problems``."""
    pm = pluggy.PluginManager("sft_spec")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("SFT_SPEC_TRACE"):
        # Every hook call, its arguments and results, on stderr.
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    from . import session

    pm.register(session, name="sft_spec.session")
    disabled = disabled or set()
    problems = problems if problems is not None else []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the run down
            problems.append(PluginProblem(ep.name, f"cannot be imported: {type(exc).__name__}: {exc}"))
            continue
        _register(pm, plugin, ep.name, problems)
    for plugin in extra_plugins or []:
        if isinstance(plugin, str):
            module_name = plugin
            try:
                plugin = import_module(module_name)
            except Exception as exc:  # noqa: BLE001 - as above, for -p NAME
                problems.append(PluginProblem(module_name, f"cannot be imported: {type(exc).__name__}: {exc}"))
                continue
        if pm.is_registered(plugin):
            continue  # -p of a module that an entry point (or an earlier -p) registered already
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        _register(pm, plugin, name if pm.get_plugin(name) is None else f"{name}-{id(plugin):x}", problems)
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
    for hook_name, add in (("sft_spec_register_checks", registry.register_check),
                           ("sft_spec_register_spec_sections", registry.register_section)):
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
            impl.function(register=lambda obj, _add=add, _plugin=impl.plugin_name: _add(obj, plugin=_plugin))
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
