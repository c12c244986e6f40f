"""Multi-process training of one spec with ``accelerate launch`` (DDP: NCCL on GPUs, gloo on a CPU).

A spec asks for it with ``launcher: {type: accelerate, num_processes: 2, config_file: PATH}``, or every
spec of a run with ``--launcher accelerate --num-processes 2``. The spec then runs in a subprocess::

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... \\
        -m sft_spec_plugins.launched SPEC_PATH ITEM_ID RESULT_JSON --setup SETUP_JSON

Every rank loads, formats, masks, trains (TRL's trainer joins the process group accelerate set up)
and generates through the same hooks as an in-process run; rank 0 writes the spec's report as JSON,
which the main process reads back and logs like any other. ``--multi_gpu`` is accelerate's
torchrun launcher; on a machine without GPUs the trainer runs on the CPU (``use_cpu``) and
``torch.distributed`` uses the gloo backend (accelerate's own ``--cpu`` flag starts one process
unless MPI is set up, so it is not used).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.fileio import atomic_write_text
from sft_spec.reports import ErrorInfo, SpecReport

#: Set in the launched processes, so that their run does not launch again.
LAUNCHED_ENV = "SFT_SPEC_LAUNCHED"


def _launcher(item, config) -> dict[str, Any] | None:
    if os.environ.get(LAUNCHED_ENV):
        return None
    spec_launcher = item.spec.launcher
    kind = config.getoption("launcher") or (spec_launcher.type if spec_launcher else None)
    if kind != "accelerate":
        return None
    processes = config.getoption("launcher_processes") or (spec_launcher.num_processes if spec_launcher else 2)
    config_file = spec_launcher.config_file if spec_launcher else None
    if config_file:
        config_file = str((Path(item.path).parent / config_file).resolve())
    return {"num_processes": int(processes), "config_file": config_file}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: dict[str, Any], args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher.get("config_file"):
        cmd += ["--config_file", launcher["config_file"]]
    else:
        # Everything accelerate would otherwise ask about (and warn when missing) is given.
        # --multi_gpu is accelerate's torchrun launcher (also for CPU processes); it wants two or more.
        multi = ["--multi_gpu"] if launcher["num_processes"] > 1 else []
        cmd += [*multi, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(launcher["num_processes"]), "--main_process_port", str(_free_port())]
    return cmd + ["-m", "sft_spec_plugins.launched", *args]


def _error(report: SpecReport, message: str, item) -> SpecReport:
    report.outcome = "error"
    report.error = ErrorInfo(message, location=str(item.location), phase="launch")
    return report


@hookimpl(tryfirst=True)
def sft_spec_run_spec(item, session) -> SpecReport | None:
    config = session.config
    launcher = _launcher(item, config)
    if launcher is None or item.spec.skip:
        return None
    from sft_spec_plugins.json_report import report_from_dict

    from sft_spec.runner import _new_report

    start = time.perf_counter()
    work = Path(config.output_dir) / "launched" / f"{abs(hash(item.nodeid)):x}"
    work.mkdir(parents=True, exist_ok=True)
    result_path, setup_path = work / "result.json", work / "setup.json"
    result_path.unlink(missing_ok=True)
    setup = {
        "argv": list(config.invocation_args) or ["run"], "cwd": os.getcwd(), "rootdir": str(config.rootdir),
        "cache_dir": str(config.cache_dir), "output_dir": str(config.output_dir),
        "expectations": [e.index for e in item.selected_expectations],
        "checks": [name for name, _, _ in item.training_checks],
    }
    atomic_write_text(setup_path, json.dumps(setup))
    cmd = launch_command(launcher, [str(item.path), item.nodeid, str(result_path), "--setup", str(setup_path)])
    env = {**os.environ, LAUNCHED_ENV: "1"}
    config.hook.sft_spec_run_progress(item=item, phase=f"train ({launcher['num_processes']} processes)", step=0,
                                      total=0, loss=None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace")
    report = _new_report(item)
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return _error(report, f"accelerate launch failed (exit code {proc.returncode}):\n{tail}", item)
    report = report_from_dict(json.loads(result_path.read_text(encoding="utf-8")))
    report.notes.append(f"trained with accelerate launch, {launcher['num_processes']} processes")
    report.metrics["launcher_seconds"] = round(time.perf_counter() - start, 3)
    return report


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--launcher", choices=("accelerate",), default=None,
                        help="train every spec in several processes with accelerate launch (DDP)")
    parser.add_argument("--num-processes", dest="launcher_processes", type=int, default=None, metavar="N",
                        help="processes per spec for --launcher (default: the spec's, else 2)")


# -- inside the launched processes -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_spec_plugins.launched")
    parser.add_argument("spec_path")
    parser.add_argument("item_id")
    parser.add_argument("result_json", type=Path)
    parser.add_argument("--setup", type=Path, required=True)
    args = parser.parse_args(argv)
    setup = json.loads(args.setup.read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.chdir(setup["cwd"])
    from sft_spec.parallel import WorkerSetup, _worker_session

    worker = WorkerSetup(argv=setup["argv"], cwd=setup["cwd"], paths=[args.spec_path], rootdir=setup["rootdir"],
                         cache_dir=setup["cache_dir"], output_dir=setup["output_dir"])
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # "cuda" in this rank means its own GPU
    # The main process already looked the spec up in the result cache and stores what comes back.
    session = _worker_session(worker, also_unregister=("result_cache_store",))
    item = next((i for i in session.items if i.nodeid == args.item_id), None)
    if item is None:
        print(f"{args.item_id} was not collected from {args.spec_path}", file=sys.stderr)
        return 3
    for exp in item.expectations:
        exp.selected = exp.index in setup["expectations"]
    item.training_checks = [c for c in item.training_checks if c[0] in setup["checks"]]
    report = session.hook.sft_spec_run_spec(item=item, session=session)
    report.metrics["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        atomic_write_text(args.result_json, json.dumps(report.to_dict(), default=str, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
