"""sft-spec: declarative regression tests for supervised fine-tuning recipes.

Plugins use the public names (no leading underscore) of the modules tests/core/test_layers.py lists.
"""

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@sft_spec.hookimpl``.
hookimpl = pluggy.HookimplMarker("sft_spec")

__all__ = ["__version__", "hookimpl"]
