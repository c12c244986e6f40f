"""Model: loading the base model (built-in, pretrained, GGUF) and what this device can run."""
