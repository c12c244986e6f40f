"""Multi-process training of one spec with ``accelerate launch`` (DDP: NCCL on GPUs, gloo on a CPU).

A spec asks for it with ``launcher: {type: accelerate, num_processes: 2, config_file: PATH}`` (a spec key
this plugin owns), or every spec of a run with ``--launcher accelerate --num-processes 2``. The spec then
runs in a subprocess::

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... \\
        -m sft_spec_plugins.train.launched SPEC_PATH ITEM_ID RESULT_JSON --setup SETUP_JSON

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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sft_spec import hookimpl
from sft_spec.bootstrap import prepare_config
from sft_spec.errors import SpecError
from sft_spec.loading.paths import check_inside
from sft_spec.registry import SpecSection
from sft_spec.reports import ErrorInfo, SpecReport, new_report, report_from_dict, report_to_dict
from sft_spec.session import Session

from ..common.files import atomic_write_text, spec_output_dir

#: Set in the launched processes, so that their run does not launch again.
LAUNCHED_ENV = "SFT_SPEC_LAUNCHED"


class LauncherSpec(BaseModel):
    """Train one spec in several processes (DDP) instead of in the sft-spec process."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["accelerate"] = Field("accelerate", description="How the processes start: accelerate launch")
    num_processes: int = Field(2, ge=1, description="Training processes (one per GPU; gloo DDP on a CPU)")
    config_file: str | None = Field(None, description="An accelerate config file, inside the spec's folder")


LAUNCHER = SpecSection("launcher", LauncherSpec, "Train in several processes: {type: accelerate, "
                       "num_processes: 2, config_file: PATH}")


@hookimpl
def sft_spec_register_spec_sections(register) -> None:
    register(LAUNCHER)


@hookimpl
def sft_spec_validate_spec(item, config) -> list[SpecError]:
    launcher = item.section(LAUNCHER)
    if launcher is None or launcher.config_file is None:
        return []
    try:
        check_inside(item.folder, launcher.config_file, "launcher.config_file")
    except ValueError as exc:
        return [SpecError(str(exc), item.locate("launcher", "config_file"), key="launcher.config_file")]
    return []


def _launcher(item, config) -> dict[str, Any] | None:
    if os.environ.get(LAUNCHED_ENV):
        return None
    spec_launcher = item.section(LAUNCHER)
    kind = config.getoption("launcher") or (spec_launcher.type if spec_launcher else None)
    if kind != "accelerate":
        return None
    processes = config.getoption("launcher_processes") or (spec_launcher.num_processes if spec_launcher else 2)
    config_file = spec_launcher.config_file if spec_launcher else None
    if config_file:
        config_file = str(check_inside(item.folder, config_file, "launcher.config_file"))
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
    return cmd + ["-m", "sft_spec_plugins.train.launched", *args]


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
    start = time.perf_counter()
    work = spec_output_dir(config, item, "launched")
    work.mkdir(parents=True, exist_ok=True)
    result_path, setup_path = work / "result.json", work / "setup.json"
    result_path.unlink(missing_ok=True)
    setup = {
        "argv": list(config.invocation_args) or ["run"], "cwd": os.getcwd(), "rootdir": str(config.rootdir),
        "cache_dir": str(config.cache_dir), "output_dir": str(config.output_dir),
        "selected": [case.nodeid for case in item.selected_cases],
    }
    atomic_write_text(setup_path, json.dumps(setup))
    cmd = launch_command(launcher, [str(item.path), item.nodeid, str(result_path), "--setup", str(setup_path)])
    env = {**os.environ, LAUNCHED_ENV: "1"}
    config.hook.sft_spec_run_progress(item=item, phase=f"train ({launcher['num_processes']} processes)", step=0,
                                      total=0, loss=None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace")
    report = new_report(item)
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return _error(report, f"accelerate launch failed (exit code {proc.returncode}):\n{tail}", item)
    report = report_from_dict(json.loads(result_path.read_text(encoding="utf-8")))
    # Named as this process names it: the child ran from its own working directory (a Ray worker's
    # unpacked project), so its path may read otherwise.
    report.nodeid, report.path = item.nodeid, str(item.location.path)
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
    parser = argparse.ArgumentParser(prog="python -m sft_spec_plugins.train.launched")
    parser.add_argument("spec_path")
    parser.add_argument("item_id")
    parser.add_argument("result_json", type=Path)
    parser.add_argument("--setup", type=Path, required=True)
    args = parser.parse_args(argv)
    setup = json.loads(args.setup.read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.chdir(setup["cwd"])
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # "cuda" in this rank means its own GPU
    # A worker: no reporters, no result cache (the main process looked the spec up and stores the result).
    prepared = prepare_config(setup["argv"], role="worker", addopts=False, paths=[Path(args.spec_path)],
                              rootdir=Path(setup["rootdir"]), cache_dir=Path(setup["cache_dir"]),
                              output_dir=Path(setup["output_dir"]))
    config = prepared.config
    session = Session(config)
    session.configure()
    session.collect(list(config.options.paths))
    item = next((i for i in session.items if i.nodeid == args.item_id), None)
    if item is None:
        print(f"{args.item_id} was not collected from {args.spec_path}", file=sys.stderr)
        return 3
    for case in item.cases:
        case.selected = case.nodeid in setup["selected"]
    try:
        report = session.hook.sft_spec_run_spec(item=item, session=session)
    finally:
        session.unconfigure()
    report.metrics["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        atomic_write_text(args.result_json, json.dumps(report_to_dict(report), default=str, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
