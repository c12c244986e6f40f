"""sft-spec: declarative regression tests for supervised fine-tuning recipes."""

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@sft_spec.hookimpl``.
hookimpl = pluggy.HookimplMarker("sft_spec")

__all__ = ["__version__", "hookimpl"]
