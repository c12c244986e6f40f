"""The plugin manager: built-in and outside plugins come from one entry-point group, ``sft_spec``.

A plugin that fails to import (any exception, a syntax error included) or implements a hook that does
not exist (a typo: pluggy's ``check_pending``, per plugin) is kept in ``problems`` and left out,
tox-style; the session reports each as an error and the other specs still run.
"""

from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager
from difflib import get_close_matches
from importlib import import_module, metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginProblem
from .registry import Registry

ENTRY_POINT_GROUP = "sft_spec"
#: Built-in plugins a run cannot do without.
ESSENTIAL_PLUGINS = ("protocol", "selection", "data", "models", "formatters", "collators", "trainer", "generation",
                     "checks", "terminal")


#: Hooks where one plugin's bug must not lose the others' work (a report, the files it records, a summary):
#: every implementation runs even after one raised (see :meth:`PluginManager.each_runs`).
RESILIENT_HOOKS = frozenset({"sft_spec_persist_report", "sft_spec_log_report", "sft_spec_session_finish"})


class PluginManager(pluggy.PluginManager):
    def __init__(self) -> None:
        super().__init__("sft_spec")
        self.add_hookspecs(hookspecs)
        self.problems: list[PluginProblem] = []
        self.commands: dict[str, tuple] | None = None  # sft-spec's subcommands, once plugins registered them
        self._raised: list[str] | None = None  # an each_runs block's problems

    @contextmanager
    def each_runs(self):
        """Inside the block, an implementation of a resilient hook that raises is recorded (as
        ``"plugin: Error: message"`` in the yielded list) and the next one still runs, seeing ``exitstatus``
        3; wrappers (``wrapper=True``) wrap the call as on any other hook, since pluggy makes it."""
        outer, self._raised = self._raised, []
        try:
            yield self._raised
        finally:
            self._raised = outer

    def _hookexec(self, hook_name, methods, kwargs, firstresult):
        # pluggy's own call loop, with each plain implementation of a resilient hook guarded: no loop of ours
        # to keep in step with pluggy's ordering, wrappers and tracing.
        raised = self._raised
        if raised is not None and hook_name in RESILIENT_HOOKS:
            methods = [_guarded_wrapper(m, kwargs, raised) if m.wrapper else m if m.hookwrapper
                       else _guarded(m, kwargs, raised) for m in methods]
        return super()._hookexec(hook_name, methods, kwargs, firstresult)

    def add(self, plugin: Any, name: str) -> None:
        """Register one plugin; a misspelled hook unregisters it, naming the plugin and the hook."""
        try:
            self.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:  # already registered; a bad signature
            self.problems.append(PluginProblem(name, str(exc)))
            return
        known = [n for n in dir(self.hook) if n.startswith("sft_spec_") and getattr(self.hook, n).spec is not None]
        unknown = [caller.name + "".join(f" (did you mean {m}?)" for m in get_close_matches(caller.name, known, n=1))
                   for caller in self.get_hookcallers(plugin) or [] if caller.spec is None]
        if unknown:
            self.unregister(plugin)
            self.problems.append(PluginProblem(name, f"implements no such hook: {', '.join(unknown)}"))


def _record(impl, exc: Exception, kwargs: dict, raised: list[str]) -> None:
    raised.append(f"{impl.plugin_name}: {type(exc).__name__}: {exc}")
    if "exitstatus" in kwargs:
        kwargs["exitstatus"] = 3  # what the session will exit with (INTERNAL_ERROR)


def _guarded(impl, kwargs: dict, raised: list[str]):
    guarded = copy.copy(impl)

    def call(*args):
        try:
            return impl.function(*args)
        except Exception as exc:  # noqa: BLE001 - one plugin's bug must not lose the others' reports
            _record(impl, exc, kwargs, raised)
            return None

    guarded.function = call
    return guarded


def _guarded_wrapper(impl, kwargs: dict, raised: list[str]):
    """A ``wrapper=True`` implementation that, when it raises, is recorded and steps aside: the inner
    implementations still run (or their result still stands) as if it were not there."""
    guarded = copy.copy(impl)

    def call(*args):
        wrapper = impl.function(*args)
        try:
            next(wrapper)
        except Exception as exc:  # noqa: BLE001 - broken before its yield (or never yielded)
            _record(impl, exc if not isinstance(exc, StopIteration) else RuntimeError("did not yield"), kwargs,
                    raised)
            return (yield)
        try:
            result = yield
        except BaseException as inner:  # the inner implementations raised: the wrapper may handle it
            try:
                wrapper.throw(inner)
            except StopIteration as stop:
                return stop.value
            except Exception as exc:  # noqa: BLE001
                if exc is not inner:
                    _record(impl, exc, kwargs, raised)
                raise inner from None
            _record(impl, RuntimeError("yielded twice"), kwargs, raised)
            raise
        try:
            wrapper.send(result)
        except StopIteration as stop:
            return stop.value
        except Exception as exc:  # noqa: BLE001 - broken after its yield: the inner result stands
            _record(impl, exc, kwargs, raised)
            return result
        _record(impl, RuntimeError("yielded twice"), kwargs, raised)
        wrapper.close()
        return result

    guarded.function = call
    return guarded


def make_plugin_manager(extra_plugins: list[Any] | None = None, disabled: set[str] | None = None) -> PluginManager:
    """Entry-point plugins, then ``-p`` modules and plugin objects; broken ones go to ``pm.problems``."""
    pm = PluginManager()
    if os.environ.get("SFT_SPEC_TRACE"):
        # Every hook call, its arguments and results, on stderr.
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    from . import session

    pm.register(session, name="sft_spec.session")
    disabled = disabled or set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled or pm.get_plugin(ep.name) is not None:
            continue
        try:
            pm.add(ep.load(), ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the run down
            pm.problems.append(PluginProblem(ep.name, f"cannot be imported: {type(exc).__name__}: {exc}"))
    for plugin in extra_plugins or []:
        if isinstance(plugin, str):
            try:
                plugin = import_module(name := plugin)
            except Exception as exc:  # noqa: BLE001 - as above, for -p NAME
                pm.problems.append(PluginProblem(name, f"cannot be imported: {type(exc).__name__}: {exc}"))
                continue
        if not pm.is_registered(plugin):  # -p of a module an entry point (or an earlier -p) registered is a no-op
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            pm.add(plugin, name if pm.get_plugin(name) is None else f"{name}-{id(plugin):x}")
    for name in ESSENTIAL_PLUGINS:
        if name not in disabled and pm.get_plugin(name) is None and not any(p.name == name for p in pm.problems):
            pm.problems.append(PluginProblem(name, "built-in plugin is not installed: reinstall sft-spec"))
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
