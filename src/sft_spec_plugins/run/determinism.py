"""``--deterministic``: deterministic kernels for runs that must repeat bit for bit, at a price.

On CPU two runs with the same seed already give identical losses and answers. On GPUs some kernels
(cuBLAS split reductions, atomics in scatter/index ops) are not deterministic; this option turns on
``torch.use_deterministic_algorithms(True)`` and sets ``CUBLAS_WORKSPACE_CONFIG`` (which cuBLAS reads
when CUDA starts, so before any model is loaded). An op without a deterministic kernel then raises
instead of varying, and that spec reports the error. The summary says what it cost.
"""

from __future__ import annotations

import os

from sft_spec import hookimpl
from sft_spec.state import StashKey

#: What --deterministic changed, to put back at the end: (deterministic algorithms on, CUBLAS_WORKSPACE_CONFIG).
PREVIOUS = StashKey[tuple[bool, str | None]]()
WORKSPACE = ":4096:8"


@hookimpl
def sft_spec_addoption(parser) -> None:
    parser.add_argument("--deterministic", action="store_true", dest="deterministic",
                        help="use deterministic kernels only (torch.use_deterministic_algorithms); slower on GPU")


@hookimpl
def sft_spec_configure(config) -> None:
    if not config.getoption("deterministic") or config.getoption("collect_only"):
        return
    import torch

    config.stash[PREVIOUS] = (torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", WORKSPACE)
    torch.use_deterministic_algorithms(True)


@hookimpl
def sft_spec_unconfigure(config) -> None:
    # Leave the process as it was: runs from Python (tests, notebooks) continue after this one.
    previous = config.stash.get(PREVIOUS, None)
    if previous is None:
        return
    import torch

    enabled, workspace = previous
    torch.use_deterministic_algorithms(enabled)
    if workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@hookimpl
def sft_spec_terminal_summary(session, write_line) -> None:
    if PREVIOUS not in session.config.stash:
        return
    trained = [r for r in session.reports if "train_seconds" in r.metrics]
    seconds = sum(r.metrics["train_seconds"] for r in trained)
    devices = sorted({str(r.settings.get("device")) for r in trained if r.settings.get("device")})
    cost = ("on CPU it costs little (most CPU kernels are deterministic already)" if devices == ["cpu"]
            else "on GPU expect slower training (no atomics-based kernels, a fixed cuBLAS workspace)")
    write_line(f"deterministic: torch.use_deterministic_algorithms(True), "
               f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}; {cost}; "
               f"training took {seconds:.1f}s over {len(trained)} spec{'s' if len(trained) != 1 else ''} "
               "(compare with a run without --deterministic)")


@hookimpl
def sft_spec_cache_key(item, config):
    return {"deterministic": bool(config.getoption("deterministic", False))}
