"""Suite: running many specs at once (worker processes, a Ray cluster)."""
