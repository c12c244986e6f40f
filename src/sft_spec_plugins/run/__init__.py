"""Run: one spec from model load to report (the protocol), and what wraps it (timeout, repeat, cache)."""
