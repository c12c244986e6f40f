"""The built-in plugins of sft-spec, registered through the ``sft_spec`` entry-point group like any other."""
