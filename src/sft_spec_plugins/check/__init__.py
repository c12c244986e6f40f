"""Check: generating answers and judging them (checks, metrics, eval sets, snapshots, baselines)."""
