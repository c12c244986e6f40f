"""``sft-spec run specs/ --ray [ADDRESS]``: the suite spread over a Ray cluster, behind the loop hook.

Each spec (each matrix variant) runs in a Ray actor placed by what it asks for (``resources: {gpus: 1,
cpus: 2, memory: 8GB}``, else ``--ray-resources``); specs that share a base model go to the same actor,
one after another, so the model is loaded once there. The project folder (``--rootdir``: the specs, their
data) and the driver's own sft-spec code reach the workers through Ray's runtime environment
(``working_dir`` and ``py_modules``), not a shared disk; workers need the same libraries (torch,
transformers, trl, ...) installed, as a cluster image has them.

Result-cache hits are decided here on the driver, before anything is sent. Reports come back as specs end
and are logged in collection order, so the terminal, JSON, JUnit and HTML reports and the files recorded
beside specs (snapshots, baselines, on the driver only) see what a local run would. A worker that dies, a
node that goes away or a spec that raises is an error for that spec, naming the node; a spec that needs
more than any node has is an error that says so; Ctrl-C cancels what is left and the reports of what
finished are still written. ``ADDRESS``: ``auto`` (the cluster ``ray start`` made on this machine),
``ray://host:port`` or ``host:port``; none starts a local cluster for this run. Usage statistics are off
(``RAY_USAGE_STATS_ENABLED=0``) unless you set that variable yourself.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sft_spec import hookimpl
from sft_spec.errors import UsageError
from sft_spec.registry import SpecSection
from sft_spec.reports import ErrorInfo, SpecReport, new_report, report_from_dict
from sft_spec.state import StashKey

if TYPE_CHECKING:
    from sft_spec.session import Session
    from sft_spec.state import SpecItem

#: Folders never sent to the cluster with the project (Ray's own defaults, which an environment variable can
#: change, included).
EXCLUDES = [".git", ".venv", "venv", "__pycache__", ".sft-spec", ".pytest_cache", ".ruff_cache", ".hypothesis",
            "node_modules", "*.egg-info", "build", "dist"]
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_memory(value: Any) -> int:
    """``8GB``, ``512MiB``, ``2e9`` or a number of bytes, as bytes."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"memory: expected bytes or a size such as 8GB or 512MiB, got {value!r}")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), (match.group(3) or "").lower() == "ib"
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(unit or " "))


class ResourcesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1, ge=0, description="CPUs the spec needs on a Ray node (--ray)")
    gpus: float = Field(0, ge=0, description="GPUs the spec needs on a Ray node (--ray)")
    memory: int | str | None = Field(None, description="Memory the spec needs on a Ray node: 8GB, 512MiB, bytes")

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        if value is None:
            return None
        memory = parse_memory(value)
        if memory <= 0:
            raise ValueError("memory must be above zero (a size such as 8GB or 512MiB)")
        return memory


RESOURCES = SpecSection("resources", ResourcesSpec, "What a spec needs on a Ray cluster (--ray): cpus, gpus, memory")


@hookimpl
def sft_spec_register_spec_sections(register) -> None:
    register(RESOURCES)


@hookimpl
def sft_spec_addoption(parser) -> None:
    parser.add_argument("--ray", dest="ray_address", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run the specs on a Ray cluster: auto, ray://host:port, host:port, or none to start a "
                        "local one (pip install \"sft-spec[ray]\")")
    parser.add_argument("--ray-resources", dest="ray_resources", default="cpus=1", metavar="cpus=N,gpus=N,memory=SIZE",
                        help="what a spec without resources: needs on a node (default cpus=1)")


@hookimpl
def sft_spec_validate_spec(item, config):
    if item.section(RESOURCES) is not None and not config.getoption("ray_address", None):
        item.notes.append(f"{item.locate('resources')}: note: resources: is used with --ray only; this run is local")
    return []


def default_resources(text: str) -> ResourcesSpec:
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        values[key.strip()] = value.strip()
    try:
        return ResourcesSpec.model_validate(values)
    except Exception as exc:  # noqa: BLE001 - pydantic's message, as a usage error
        raise UsageError(f"--ray-resources {text!r}: {exc}") from None


# -- the driver ------------------------------------------------------------------------------------------


@hookimpl(tryfirst=True)
def sft_spec_runtestloop(session: Session) -> bool | None:
    config = session.config
    address = config.getoption("ray_address", None)
    if config.role != "main" or not address:
        return None
    try:
        import ray
    except ImportError:
        raise UsageError('--ray needs the ray package: pip install "sft-spec[ray]"') from None
    run_on_ray(session, ray, address)
    return True


def _stage_modules() -> list[str]:
    """sft_spec and sft_spec_plugins as folders with their import names, for ``py_modules``."""
    import sft_spec
    import sft_spec_plugins

    staged = Path(tempfile.mkdtemp(prefix="sft-spec-ray-modules-"))
    out = []
    for package in (sft_spec, sft_spec_plugins):
        source = Path(package.__file__).parent
        target = staged / package.__name__
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out.append(str(target))
    return out


def _escaped_pattern(relative: str) -> str:
    """An anchored gitwildmatch pattern (Ray's excludes) that matches exactly this path."""
    return "/" + re.sub(r"([\\*?\[\]!#])", r"\\\1", relative)


def upload_excludes(root: Path) -> tuple[list[str], list[str]]:
    """What Ray's runtime environment must leave out of the project it zips, and a note for each.

    Ray's packaging follows symlinks: a committed link to ``/etc`` or ``~/.ssh`` would unpack those files on
    every node, and a link to a parent folder would recurse until the path is too long. So every link to a
    folder, and every link to a file that resolves outside the project (or nowhere), is left out; links to
    files inside the project are sent as their files. Each pattern is checked with the matcher Ray uses; a
    name it cannot express stops the run instead of being sent."""
    from fnmatch import fnmatch

    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray applies to excludes

    root = Path(root).resolve()
    patterns, notes = [], []
    for folder, dirs, files in os.walk(root):  # never follows links
        dirs[:] = [d for d in dirs if not any(fnmatch(d, pattern) for pattern in EXCLUDES)]
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if not path.is_symlink():
                continue
            relative = path.relative_to(root).as_posix()
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):
                why = "a broken link or a link loop"
            else:
                inside = target == root or root in target.parents
                why = ("a link to a folder (Ray would follow it, into a loop or out of the project)" if target.is_dir()
                       else f"a link out of the project (to {target})" if not inside
                       else _not_sent(root, target.relative_to(root)))
            if why is None:
                continue
            pattern = _escaped_pattern(relative)
            if not PathSpec.from_lines("gitwildmatch", [pattern]).match_file(relative):
                raise UsageError(f"--ray: {relative} is {why}, and its name cannot be left out of the upload; "
                                 "remove or rename it")
            patterns.append(pattern)
            notes.append(f"--ray: {relative} is not sent to the cluster: {why}")
    return patterns, notes


def _not_sent(root: Path, target: Path) -> str | None:
    """Why a file inside the project that a link points at is not sent itself (so neither is the link):
    a hidden or excluded folder (``.git/config``, ``.venv``), a hidden file (``.env``), or ignored by git."""
    import subprocess
    from fnmatch import fnmatch

    why = f"a link to {target.as_posix()}, which is not sent itself"
    if any(part.startswith(".") or any(fnmatch(part, pattern) for pattern in EXCLUDES) for part in target.parts):
        return why + " (hidden or excluded)"
    try:  # what .gitignore leaves out, Ray leaves out: a link must not carry it
        ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", "--", target.as_posix()],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ignored = False
    return why + " (ignored by git)" if ignored else None


UPLOAD_NOTES = StashKey[list[str]]()


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        raise UsageError(f"--ray sends the project folder {root} to the cluster: {path} is outside it "
                         "(run from the project, or set --rootdir)") from None


def group_key(item) -> tuple:
    """Specs with the same key can share one loaded base model on a worker."""
    spec = item.spec
    return (spec.model.id, spec.model.dtype, spec.method == "qlora", repr(sorted(spec.quantization.items())))


def assign(items: list[int], keys: dict[int, tuple], workers: int) -> list[list[int]]:
    """Items to workers: whole groups where there are enough of them, else groups split evenly."""
    groups: dict[tuple, list[int]] = {}
    for index in items:
        groups.setdefault(keys[index], []).append(index)
    chunks = list(groups.values())
    while len(chunks) < workers and any(len(c) > 1 for c in chunks):
        largest = max(chunks, key=len)
        chunks.remove(largest)
        half = len(largest) // 2
        chunks += [largest[:half], largest[half:]]
    out: list[list[int]] = [[] for _ in range(min(workers, len(chunks)))]
    for chunk in sorted(chunks, key=len, reverse=True):
        min(out, key=len).extend(chunk)
    return [sorted(queue) for queue in out if queue]


def _needs(item, default: ResourcesSpec) -> ResourcesSpec:
    return item.section(RESOURCES) or default


def _too_big(needs: ResourcesSpec, nodes: list[dict]) -> str | None:
    def fits(node: dict) -> bool:
        res = node.get("Resources", {})
        return (res.get("CPU", 0) >= needs.cpus and res.get("GPU", 0) >= needs.gpus
                and (needs.memory is None or res.get("memory", 0) >= needs.memory))

    if any(fits(n) for n in nodes):
        return None
    best = max(nodes, key=lambda n: (n.get("Resources", {}).get("GPU", 0), n.get("Resources", {}).get("CPU", 0)),
               default={})
    res = best.get("Resources", {})
    asked = f"{needs.cpus:g} CPUs, {needs.gpus:g} GPUs" + (f", {needs.memory / 2**30:.1f} GiB memory"
                                                           if needs.memory else "")
    return (f"the spec needs {asked}; no node of the Ray cluster has that (the largest offers {res.get('CPU', 0):g} "
            f"CPUs, {res.get('GPU', 0):g} GPUs, {res.get('memory', 0) / 2**30:.1f} GiB memory)")


def error_report(item, message: str, kind: str = "error") -> SpecReport:
    report = new_report(item, "error")
    report.error = ErrorInfo(message, location=str(item.location), phase="ray", kind=kind)
    return report


def run_on_ray(session: Session, ray, address: str) -> None:
    from .workers import WorkerSetup

    config = session.config
    items = session.items
    reused = {i: session.hook.sft_spec_reuse_report(item=item, session=session) for i, item in enumerate(items)}
    results: dict[int, SpecReport] = {i: r for i, r in reused.items() if r is not None}
    todo = [i for i in range(len(items)) if i not in results]
    logged = 0

    def flush(everything: bool = False) -> None:
        nonlocal logged
        while logged < len(items) and (logged in results or everything) and not session.shouldstop:
            report = results.pop(logged, None)
            logged += 1
            if report is not None:
                session.log_report(report)

    if not todo:
        flush()
        return
    root = Path(config.rootdir).resolve()
    where = {i: (_relative(items[i].path, root), items[i].nodeid.split("::", 1)[1]) for i in todo}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    left_out, config.stash[UPLOAD_NOTES] = upload_excludes(root)
    modules = _stage_modules()
    runtime_env = {"working_dir": str(root), "excludes": [*EXCLUDES, *left_out], "py_modules": modules,
                   "env_vars": {"RAY_USAGE_STATS_ENABLED": os.environ["RAY_USAGE_STATS_ENABLED"],
                                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get(
                                    "HF_HUB_OFFLINE", "0")}}
    if address == "local" and not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
        # A new local cluster turns on Ray's token authentication and would save a token in ~/.ray, which
        # every later `ray start` on this machine then picks up: a token of this run's own, in memory only.
        import secrets

        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # "local" said explicitly: without an address ray.init() joins a cluster `ray start` left running.
    init = {"address": "local", "runtime_env": runtime_env, "log_to_driver": False, "logging_level": "warning",
            "include_dashboard": False} if address == "local" else {"address": address, "runtime_env": runtime_env,
                                                                   "log_to_driver": False, "logging_level": "warning"}
    try:
        ray.init(**init)
    except Exception as exc:  # noqa: BLE001 - a cluster that is not there is the user's setup, said as such
        raise UsageError(f"--ray {address}: cannot connect to a Ray cluster: {type(exc).__name__}: {exc}") from None
    actors: list[Any] = []
    try:
        default = default_resources(config.getoption("ray_resources", "cpus=1") or "cpus=1")
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        runnable = []
        for i in todo:
            problem = _too_big(_needs(items[i], default), nodes)
            if problem:
                results[i] = error_report(items[i], problem)
            else:
                runnable.append(i)
        queues = assign(runnable, {i: group_key(items[i]) for i in runnable},
                        _slots([_needs(items[i], default) for i in runnable], nodes))
        setup = WorkerSetup(argv=list(config.invocation_args), cwd=".", paths=[], rootdir=".",
                            cache_dir=str(config.cache_dir), output_dir="")
        worker_class = ray.remote(max_restarts=0, max_concurrency=1)(SpecWorker)

        def start(queue: list[int]):
            needs = [_needs(items[i], default) for i in queue]
            memory = max((n.memory or 0) for n in needs)
            actor = worker_class.options(num_cpus=max(n.cpus for n in needs), num_gpus=max(n.gpus for n in needs),
                                         **({"memory": memory} if memory else {})).remote(dataclasses.asdict(setup))
            actors.append(actor)
            return actor

        running: dict[Any, tuple[Any, list[int], int]] = {}  # ref -> (actor, its queue, index)

        def submit(actor, queue: list[int]) -> None:
            if queue and not session.shouldstop:
                index = queue.pop(0)
                selected = [c.nodeid.split("::", 1)[1] for c in items[index].selected_cases]
                ref = actor.run.remote(*where[index], selected, items[index].nodeid, str(items[index].location.path))
                running[ref] = (actor, queue, index)

        for queue in queues:
            submit(start(queue), queue)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                actor, queue, index = running.pop(ref)
                try:
                    results[index] = report_from_dict(ray.get(ref))
                except ray.exceptions.RayActorError as exc:  # the worker process or its node went away
                    results[index] = error_report(items[index], f"the Ray worker running this spec died: "
                                                  f"{_node_of(exc)}{_first_line(exc)}",
                                                  kind="crash")
                    actor = start(queue) if queue else actor  # a fresh worker for the rest of its queue
                except ray.exceptions.RayTaskError as exc:
                    results[index] = error_report(items[index], f"raised on the Ray cluster: {_first_line(exc)}")
                if queue:
                    submit(actor, queue)
                else:  # its queue is done: free its CPUs and GPUs for a worker still waiting to be placed
                    _kill(ray, actor)
            flush()
        flush(everything=True)
    except KeyboardInterrupt:
        session.interrupted = True
        flush(everything=True)  # what finished is reported; the rest was cancelled
    finally:
        if not session.interrupted:  # a clean end: each worker's session ends as the driver's does
            for actor in actors:
                try:
                    ray.get(actor.close.remote(), timeout=30)
                except Exception:  # noqa: BLE001, S110 - a worker that is gone has nothing to end
                    pass
        for actor in actors:
            _kill(ray, actor)
        ray.shutdown()
        shutil.rmtree(Path(modules[0]).parent, ignore_errors=True)


@hookimpl
def sft_spec_terminal_summary(session, write_line) -> None:
    for note in session.config.stash.get(UPLOAD_NOTES, []):
        write_line(note)


def _slots(needs: list[ResourcesSpec], nodes: list[dict]) -> int:
    """How many workers the cluster holds at once, by CPUs and, where specs ask for them, GPUs and memory."""
    total = {key: sum(n.get("Resources", {}).get(key, 0) for n in nodes) for key in ("CPU", "GPU", "memory")}
    slots = [total["CPU"] // (max(n.cpus for n in needs) or 1)]
    if any(n.gpus for n in needs):
        slots.append(total["GPU"] // max(n.gpus for n in needs))
    if any(n.memory for n in needs):
        slots.append(total["memory"] // max(n.memory or 0 for n in needs))
    return max(1, int(min(slots)))


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001, S110 - already gone
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _node_of(exc: BaseException) -> str:
    """The node in Ray's own error: ActorDiedError's "ip:" line, or a "Worker IP address:" / "node_ip" note."""
    match = re.search(r"^\s*ip: ([0-9a-fA-F.:]+)|IP address: ([0-9.]+)|node[_ ]?(?:ip|IP)[^0-9]*([0-9.]+)", str(exc),
                      re.MULTILINE)
    ip = next((g for g in match.groups() if g), "") if match else ""
    return f"on node {ip}: " if ip else ""


def _this_node(ray) -> tuple[str, str]:
    """This worker's node: its id, and the address the cluster knows it by (``--node-ip-address``)."""
    node_id = ray.get_runtime_context().get_node_id()
    address = next((n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("NodeID") == node_id), "")
    return node_id, address or ray.util.get_node_ip_address()


# -- the worker ------------------------------------------------------------------------------------------


class SpecWorker:
    """One sft-spec session on a Ray node, running the specs it is sent one after another (its model cache
    keeps a shared base model loaded between them)."""

    def __init__(self, setup: dict):
        from .workers import WorkerSetup, worker_session

        setup = dict(setup)
        cache = Path(setup["cache_dir"])
        if not (cache.exists() and os.access(cache, os.W_OK)):  # another machine: its own cache
            from sft_spec.config import default_cache_dir

            setup["cache_dir"] = str(default_cache_dir())
        self.output = tempfile.mkdtemp(prefix="sft-spec-ray-")
        root = Path.cwd().resolve()  # the project, unpacked by Ray's runtime environment
        setup.update(cwd=str(root), paths=[str(root)], rootdir=str(root), output_dir=self.output)
        # Every spec of the project: the driver selected (-k, -m, --lf, --shard) and sends each by its place.
        self.session = worker_session(WorkerSetup(**setup), select=False)
        self.session.config.pluginmanager.register(NodeOfThisWorker(), "sft-spec-ray-node")
        self.by_place = {(Path(i.path).resolve().relative_to(root).as_posix(), i.nodeid.split("::", 1)[1]): i
                         for i in self.session.items}

    def close(self) -> None:
        """The session's end on this worker (sft_spec_unconfigure), before the driver lets the actor go."""
        self.session.unconfigure()

    def run(self, path: str, name: str, selected: list[str], driver_nodeid: str, driver_path: str) -> dict:
        import json

        from sft_spec.reports import report_to_dict

        item = self.by_place.get((path, name))
        if item is None:
            raise RuntimeError(f"{path}::{name} was not collected on the Ray worker")
        # Made with the driver's ids and the node's name (a plugin of this session): returned as made.
        report = self.session.hook.sft_spec_run_spec(item=as_the_driver_names_it(item, driver_nodeid, driver_path,
                                                                                 selected), session=self.session)
        return json.loads(json.dumps(report_to_dict(report), default=str))


def as_the_driver_names_it(item: SpecItem, driver_nodeid: str, driver_path: str, selected: list[str]) -> SpecItem:
    """``item`` as the driver collected it: its id and path (the driver ran from its own folder, this worker from
    the unpacked project), its cases' ids and the driver's selection. A copy: the worker's own item is left as
    collected for the next run of it."""
    def driver_id(nodeid: str) -> str:
        return driver_nodeid + nodeid[len(item.nodeid):] if nodeid.startswith(item.nodeid) else nodeid

    def case(c):
        return dataclasses.replace(c, nodeid=driver_id(c.nodeid), selected=c.nodeid.split("::", 1)[1] in selected)

    location = dataclasses.replace(item.location, path=driver_path)
    return dataclasses.replace(item, nodeid=driver_nodeid, location=location,
                               expectations=[case(e) for e in item.expectations],
                               training_checks=[case(c) for c in item.training_checks])


class NodeOfThisWorker:
    """Names the Ray node in every report this worker makes (``metrics["ray_node"]``, ``["ray_node_ip"]``),
    as part of making it: the outermost wrapper of the run."""

    def __init__(self):
        import ray

        self.node = _this_node(ray)

    @hookimpl(wrapper=True, tryfirst=True)  # outside --timeout's wrapper, which makes a timed-out spec's report
    def sft_spec_run_spec(self, item, session):
        report = yield  # a spec that errored too (sft_spec_make_report is only called for one that ran)
        if report is not None:
            report.metrics["ray_node"], report.metrics["ray_node_ip"] = self.node
        return report
