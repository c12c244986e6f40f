"""sft-spec: declarative regression tests for supervised fine-tuning recipes.

The public names a plugin uses: ``hookimpl``, the typed state (:mod:`sft_spec.state`), the registry's
types (:mod:`sft_spec.registry`), report objects (:mod:`sft_spec.reports`) and errors
(:mod:`sft_spec.errors`). Names starting with an underscore are the core's own.
"""

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@sft_spec.hookimpl``.
hookimpl = pluggy.HookimplMarker("sft_spec")

__all__ = ["__version__", "hookimpl"]
