"""The suite on a real Ray cluster: a head and a second node started with ``ray start`` on 127.0.0.1
(usage statistics off: no traffic leaves the machine). Marked ``ray``: ``.ci/run`` runs them with
``pytest -m ray``; the fast suite leaves them out."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None,
                                                  reason='needs the ray extra: pip install "sft-spec[ray]"')]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The cluster listens on 127.0.0.1 only; without token authentication a token some earlier ray.init() left
# in ~/.ray cannot stop the second node from joining.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A two-node local cluster, one CPU and 2 GB of (Ray's, logical) memory each, and one GPU (a label only:
    Ray places by it, torch never sees a device) on the head; stopped (and every Ray process with it) at the
    end."""
    port = _free_port()
    ray = str(BIN / "ray")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--memory=2000000000", "--disable-usage-stats"]
    subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false", "--num-gpus=1", *common],
                   env=ENV,
                   check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common], env=ENV, check=True,
                       capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=ENV, capture_output=True, timeout=120)


def sft_spec(*args, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sft-spec"), *map(str, args)], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def outcomes(path: Path) -> dict[str, str]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {c["nodeid"]: c["outcome"] for s in doc["specs"] for c in s["expectations"] + s["training_checks"]}


def test_specs_run_on_the_cluster_with_the_ids_and_outcomes_of_a_local_run(cluster, tmp_path):
    cache = {"SFT_SPEC_CACHE": str(tmp_path / "cache")}
    local = sft_spec("run", "specs/", "--json", tmp_path / "local.json", "--no-cache", cwd=REPO, env=cache)
    remote = sft_spec("run", "specs/", "--ray", cluster, "--json", tmp_path / "ray.json", "--no-cache", cwd=REPO,
                      env=cache)
    assert remote.returncode == local.returncode == 0, remote.stdout + remote.stderr
    assert outcomes(tmp_path / "ray.json") == outcomes(tmp_path / "local.json")
    doc = json.loads((tmp_path / "ray.json").read_text(encoding="utf-8"))
    assert len({s["metrics"]["ray_node"] for s in doc["specs"]}) == 2  # both nodes ran specs
    # Specs that share a base model shared a worker: the tiny-gemma specs all ran on one node.
    gemma = {s["metrics"]["ray_node"] for s in doc["specs"] if s["model"] == "builtin:tiny-gemma"}
    assert len(gemma) == 1


SPEC = """\
    model: builtin:tiny-gemma
    method: lora
    lora: {{r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}}
    training: {{num_train_epochs: {epochs}, learning_rate: 1.0e-2}}
    data:
      conversations:
        - - {{role: user, content: 微调测试}}
          - {{role: assistant, content: 我学会了}}
    checks: {{loss_decreased: true}}
"""

CRASHER = """\
import os

from sft_spec import hookimpl


@hookimpl(tryfirst=True)
def sft_spec_run_spec(item, session):
    if item.name == "crash" and session.config.role == "worker":
        os._exit(1)  # the worker process dies, as it would on a segfault or the OOM killer
"""


def project(tmp_path: Path, specs: dict[str, str], plugin: str = "") -> Path:
    root = tmp_path / "project"
    (root / "specs").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'p'\n", encoding="utf-8")
    for name, text in specs.items():
        (root / "specs" / f"{name}.sft.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    if plugin:
        (root / "crasher.py").write_text(plugin, encoding="utf-8")
    return root


def test_a_worker_that_dies_is_an_error_for_its_spec_and_the_others_run(cluster, tmp_path):
    root = project(tmp_path, {"crash": SPEC.format(epochs=2), "fine": SPEC.format(epochs=2)}, CRASHER)
    done = sft_spec("run", "specs/", "--ray", cluster, "-p", "crasher", "--json", tmp_path / "r.json", "--no-cache",
                    cwd=root, env={"PYTHONPATH": str(root), "SFT_SPEC_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    by_name = {s["name"]: s for s in doc["specs"]}
    assert by_name["crash"]["outcome"] == "error"
    # Named by the address the cluster knows the node by (both nodes of this local cluster share the machine's).
    message = by_name["crash"]["error"]["message"]
    named = re.search(r"the Ray worker running this spec died: on node ([0-9.]+): ", message)
    assert named and named.group(1) == by_name["fine"]["metrics"]["ray_node_ip"], message
    assert by_name["fine"]["outcome"] == "passed"


MADE_AS = """\
from sft_spec import hookimpl


@hookimpl
def sft_spec_make_report(item, run, report):
    report.extra["made_as"] = {"nodeid": report.nodeid, "path": report.path,
                               "cases": [case.nodeid for case in report.cases]}


@hookimpl(tryfirst=True)
def sft_spec_load_model(item, config):
    if item.name == "boom":
        raise RuntimeError("the model loader exploded")
"""


def test_a_report_is_made_on_the_worker_with_the_drivers_ids(cluster, tmp_path):
    # Run from the specs' own folder: the driver names the file "a.sft.yaml", the worker (running from the
    # unpacked project) "specs/a.sft.yaml". The report a plugin sees while it is made is the one returned;
    # before, the worker rewrote ids and paths after it was made.
    root = project(tmp_path, {"a": SPEC.format(epochs=2), "boom": SPEC.format(epochs=2)}, MADE_AS)
    done = sft_spec("run", ".", "--ray", cluster, "-p", "crasher", "--json", tmp_path / "r.json", "--no-cache",
                    cwd=root / "specs", env={"PYTHONPATH": str(root), "SFT_SPEC_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 1, done.stdout + done.stderr
    spec, boom = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["specs"]
    cases = [c["nodeid"] for c in spec["expectations"] + spec["training_checks"]]
    assert spec["extra"]["made_as"] == {"nodeid": spec["nodeid"], "path": "a.sft.yaml", "cases": cases}
    assert spec["metrics"]["ray_node"]
    # A spec that errored on the worker names its node too (and its path as the driver names it).
    assert boom["outcome"] == "error" and boom["metrics"]["ray_node"] and boom["path"] == "boom.sft.yaml", boom


def test_a_spec_that_needs_more_than_any_node_has_is_an_error_that_says_so(cluster, tmp_path):
    big = SPEC.format(epochs=1) + "    resources: {gpus: 4}\n"
    root = project(tmp_path, {"big": big, "fine": SPEC.format(epochs=2)})
    done = sft_spec("run", "specs/", "--ray", cluster, "--no-cache", cwd=root,
                    env={"SFT_SPEC_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 1
    assert "the spec needs 1 CPUs, 4 GPUs; no node of the Ray cluster has that" in done.stdout
    assert "1 passed, 1 error" in done.stdout


def test_specs_of_two_base_models_that_each_need_the_one_gpu_take_turns(cluster, tmp_path):
    # Two groups, one GPU in the cluster: the first worker must free it when its queue is done, or the
    # second is never placed and the run hangs.
    other = SPEC.replace("builtin:tiny-gemma", "builtin:tiny-chatml")
    gpu = "    resources: {gpus: 1}\n"
    root = project(tmp_path, {"gemma": SPEC.format(epochs=2) + gpu, "chatml": other.format(epochs=2) + gpu})
    done = sft_spec("run", "specs/", "--ray", cluster, "--no-cache", cwd=root, timeout=300,
                    env={"SFT_SPEC_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout + done.stderr


def test_a_worker_whose_specs_are_done_makes_room_for_one_still_waiting(cluster, tmp_path):
    # 1.2 GB each: the cluster's 4 GB and 2 CPUs count three workers at once, but each node holds one. The
    # third is placed only when a worker that has finished is ended (kept alive, it holds its node for ever).
    needs = "    resources: {cpus: 0.5, memory: 1.2GB}\n"
    root = project(tmp_path, {name: SPEC.format(epochs=2) + needs for name in ("a", "b", "c")})
    done = sft_spec("run", "specs/", "--ray", cluster, "--no-cache", cwd=root, timeout=300,
                    env={"SFT_SPEC_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout + done.stderr


def test_ray_without_an_address_starts_a_cluster_of_its_own_and_leaves_no_token_behind(cluster, tmp_path):
    # The fixture's cluster is running: --ray with no address must not join it. And a new local cluster
    # turns on Ray's token authentication: its token must not land in ~/.ray, where every later
    # `ray start` would pick it up.
    root = project(tmp_path, {"a": SPEC.format(epochs=2)})
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in ENV.items() if k != "RAY_AUTH_MODE"}
    done = subprocess.run([str(BIN / "sft-spec"), "run", "specs/", "--ray", "--json", str(tmp_path / "r.json"),
                           "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**env, "HOME": str(home), "SFT_SPEC_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (home / ".ray" / "auth_token").exists()
    node = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["specs"][0]["metrics"]["ray_node"]
    script = (f"import ray; ray.init(address={cluster!r}, logging_level='error'); "
              "print([n['NodeID'] for n in ray.nodes()])")
    listed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert listed.returncode == 0 and listed.stdout.count("'") == 4, listed.stdout + listed.stderr  # two node ids
    assert node and node not in listed.stdout


def test_a_shard_on_the_cluster_runs_the_slice_a_local_shard_runs(cluster, tmp_path):
    # The workers collect the whole project, not the driver's paths: they must not slice it again.
    root = project(tmp_path, {"a": SPEC.format(epochs=2), "b": SPEC.format(epochs=2)})
    (root / "other").mkdir()
    (root / "other" / "c.sft.yaml").write_text(textwrap.dedent(SPEC.format(epochs=2)), encoding="utf-8")
    cache = {"SFT_SPEC_CACHE": str(tmp_path / "cache")}
    runs = {}
    for name, extra in (("local", []), ("ray", ["--ray", cluster])):
        done = sft_spec("run", "specs/", "--shard", "2/2", *extra, "--json", tmp_path / f"{name}.json", "--no-cache",
                        cwd=root, env=cache)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[name] = outcomes(tmp_path / f"{name}.json")
    assert runs["ray"] == runs["local"] and list(runs["ray"]) == ["specs/b.sft.yaml::b::checks[loss_decreased]"]


def test_an_unchanged_suite_costs_no_cluster_time(cluster, tmp_path):
    root = project(tmp_path, {"a": SPEC.format(epochs=2)})
    cache = {"SFT_SPEC_CACHE": str(tmp_path / "cache")}
    first = sft_spec("run", "specs/", "--ray", cluster, cwd=root, env=cache)
    # Every result is reused on the driver, so not even the cluster's address is used: a wrong one works.
    again = sft_spec("run", "specs/", "--ray", "127.0.0.1:1", cwd=root, env=cache)
    assert first.returncode == again.returncode == 0, again.stdout + again.stderr
    assert "(cached)" in again.stdout


def test_ctrl_c_cancels_what_is_left_and_reports_what_finished(cluster, tmp_path):
    specs = {"a_quick": SPEC.format(epochs=1), **{f"b_slow{i}": SPEC.format(epochs=3000) for i in range(3)}}
    root = project(tmp_path, specs)
    results = tmp_path / "r.json"
    process = subprocess.Popen([str(BIN / "sft-spec"), "run", "specs/", "--ray", cluster, "--json", str(results),
                                "--no-cache"], cwd=root, env={**ENV, "SFT_SPEC_CACHE": str(tmp_path / "cache")},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # under pytest -n, SIGINT is ignored and the child would inherit that
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until the quick spec's report is in the JSON
        if results.exists() and any(s["name"] == "a_quick" for s in json.loads(results.read_text())["specs"]):
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, out + err
    doc = json.loads(results.read_text(encoding="utf-8"))
    assert [s["name"] for s in doc["specs"]] == ["a_quick"] and doc["interrupted"] is True


def test_links_out_of_the_project_and_link_loops_are_left_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    from sft_spec_plugins.suite.ray_cluster import EXCLUDES, upload_excludes

    root = project(tmp_path, {"a": SPEC.format(epochs=2)})
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "secret.txt").write_text("secret", encoding="utf-8")
    (root / "specs" / "data").mkdir()
    (root / "specs" / "data" / "rows.jsonl").write_text("{}\n", encoding="utf-8")
    (root / "specs" / "data" / "out").symlink_to(outside, target_is_directory=True)
    (root / "specs" / "data" / "secret [1]*.txt").symlink_to(outside / "deep" / "secret.txt")
    (root / "specs" / "data" / "same.jsonl").symlink_to(root / "specs" / "data" / "rows.jsonl")
    (root / "specs" / "loop").symlink_to(root, target_is_directory=True)
    (root / ".venv").mkdir()
    (root / ".venv" / "python").symlink_to(sys.executable)  # excluded anyway: never walked
    patterns, notes = upload_excludes(root)
    assert sorted(notes) == sorted([
        "--ray: specs/data/out is not sent to the cluster: a link to a folder (Ray would follow it, into a loop or "
        "out of the project)",
        f"--ray: specs/data/secret [1]*.txt is not sent to the cluster: a link out of the project (to "
        f"{(outside / 'deep' / 'secret.txt').resolve()})",
        "--ray: specs/loop is not sent to the cluster: a link to a folder (Ray would follow it, into a loop or out "
        "of the project)"])
    archive = tmp_path / "upload.zip"
    _zip_files(str(root), [*EXCLUDES, *patterns], str(archive), include_gitignore=True)  # what Ray uploads
    import zipfile

    names = sorted(n for n in zipfile.ZipFile(archive).namelist() if not n.endswith("/"))
    assert names == ["pyproject.toml", "specs/a.sft.yaml", "specs/data/rows.jsonl", "specs/data/same.jsonl"]


def test_a_run_with_links_out_and_a_loop_finishes_and_says_what_was_left_out(cluster, tmp_path):
    root = project(tmp_path, {"a": SPEC.format(epochs=2)})
    marker = f"sft-spec-outside-{os.getpid()}-{time.time_ns()}.txt"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / marker).write_text("secret", encoding="utf-8")
    (root / "specs" / "out").symlink_to(outside, target_is_directory=True)
    (root / "specs" / "loop").symlink_to(root, target_is_directory=True)
    done = sft_spec("run", "specs/", "--ray", cluster, "--no-cache", cwd=root, timeout=300,
                    env={"SFT_SPEC_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--ray: specs/out is not sent to the cluster" in done.stdout
    assert "--ray: specs/loop is not sent to the cluster" in done.stdout
    unpacked = [p for p in Path(tempfile.gettempdir(), "ray").rglob(marker)] if Path(
        tempfile.gettempdir(), "ray").is_dir() else []
    assert unpacked == []
