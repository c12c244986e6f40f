"""Helpers shared by the phases (paths and writes, escaping, recorded files, statistics); not plugins."""
