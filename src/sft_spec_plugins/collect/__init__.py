"""Collect: the data a spec names (files, datasets, rows), which specs run (-k, --lf, shards)."""
