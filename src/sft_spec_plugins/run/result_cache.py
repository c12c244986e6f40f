"""Result cache: an unchanged spec is not trained again; its recorded report is reused.

The key is a hash of everything that decides a result: the normalised spec (after defaults and matrix),
its conversations, chat template and selected cases, the library versions, the code of sft-spec and of
the plugins loaded, and what each plugin says decides it through ``sft_spec_cache_key`` (the bytes of
data files and of recorded snapshots and baselines, the model's identity and revision, the device,
``--deterministic``, ``--stop-when-learnt``, ``--on-unsupported`` and the permissions). Entries live
under ``<cache dir>/results`` (``--cache-dir``, ``$SFT_SPEC_CACHE``); each holds the report as JSON with
its own hash and, for LoRA, the trained adapter. A damaged entry is discarded and rebuilt. ``--no-cache``
runs everything; ``sft-spec cache clear`` removes the entries. Specs with snapshot or loss-baseline
checks are run afresh under ``--update-snapshots`` / ``--update-baselines``, which must see a real
answer and curve.

Hits are decided on the main process (``sft_spec_reuse_report``), before a spec is run or sent to a
worker, and results are stored there as their reports are logged, wherever the spec ran.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
from pathlib import Path

from sft_spec import hookimpl
from sft_spec.errors import UsageError
from sft_spec.reports import report_from_dict
from sft_spec.state import StashKey

from ..common import recorded as rec
from ..common.files import output_path, spec_output_dir

FORMAT = 2  # bump when the entry layout changes: old entries are then simply never found
CACHEABLE = ("passed", "failed", "xfailed", "xpassed")
ADAPTER = "cached_adapter"  # report.extra key: the folder the trained adapter was saved to
_SAVED = StashKey[str]()


def results_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "results"


@functools.lru_cache(maxsize=1)
def _built_in(module: str) -> bool:
    return module.split(".")[0] in ("sft_spec", "sft_spec_plugins")




def cache_key(item, config) -> str:
    """The hash of what decides the spec's result: its own inputs here, and every plugin's
    (``sft_spec_cache_key``: options, files, the model's identity)."""
    spec = item.spec
    # Every contribution whole, sorted: two plugins that name an input alike both count.
    inputs = sorted(json.dumps(c, sort_keys=True, default=str)
                    for c in config.hook.sft_spec_cache_key(item=item, config=config) if c)
    return rec.sha256({
        "format": FORMAT,
        "nodeid": item.nodeid,
        "path": str(Path(item.path).resolve()),
        "spec": spec.model_dump(mode="json"),
        "sections": {name: section.model_dump(mode="json") for name, section in sorted(item.sections.items())},
        "conversations": item.conversations,
        "chat_template": item.chat_template,
        "selected": [case.nodeid for case in item.selected_cases],
        # Plugins' cases read files at collection (an eval set's rows): their str() names the contents.
        "training_checks": [[case.nodeid, str(case.argument)] for case in item.training_checks],
        **rec.code_and_versions(),
        # Plugin modules (installed or -p) and their code, not objects: reporters registered for --json,
        # --html and the like do not change a result; an edited or upgraded plugin may.
        # Built-in plugins are in "code" already: which of them a front end loads (the CLI's terminal
        # reporter, pytest's bridge) decides nothing, so `pytest specs/` and `sft-spec run specs/` share results.
        "plugins": sorted(f"{name}={p.__name__}:{rec.content_hash(Path(p.__file__))}"
                          for name, p in config.pluginmanager.list_name_plugin()
                          if getattr(p, "__file__", None) and not _built_in(p.__name__)),
        "inputs": inputs,
    })


def _bypass(item, config) -> bool:
    checks = {name for exp in item.expectations for name, _ in exp.checks}
    training = {check.name for check in item.training_checks}
    return bool((config.getoption("update_snapshots", False) and "snapshot" in checks)
                or (config.getoption("update_baselines", False) and "loss_baseline" in training))


class ResultCache:
    """Registered at configure time unless ``--no-cache``."""

    def __init__(self, config):
        self.config = config
        self.root = results_dir(config.cache_dir)
        self.keys: dict[str, str] = {}
        self.staged: dict[str, Path] = {}
        self.unkeyed: list[str] = []  # specs whose key could not be computed, and why
        self.reused: list[str] = []
        self.stored: list[str] = []
        self.discarded: list[str] = []

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def load(self, key: str):
        folder = self.entry(key)
        path = folder / "report.json"
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            body = json.dumps(doc["report"], sort_keys=True, ensure_ascii=False, default=str)
            if doc.get("key") != key or doc.get("sha256") != rec.sha256(body.encode("utf-8")):
                raise ValueError("hash mismatch")
            return report_from_dict(doc["report"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.discarded.append(f"{folder} ({type(exc).__name__}: {exc})"[:300])
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def store(self, key: str, report, adapter: Path | None) -> None:
        from ..common.files import atomic_write_text

        folder = self.entry(key)
        if adapter is not None and adapter.is_dir():  # a worker on this machine saved it; a remote one did not
            target = folder / "adapter"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(adapter, target)
            # The run's folder was temporary: the report names where the adapter is kept.
            report.extra[ADAPTER] = str(target)
        data = report.to_dict()
        body = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
        doc = {"key": key, "sha256": rec.sha256(body.encode("utf-8")), "report": json.loads(body)}
        # The report goes last: an entry without it is not an entry.
        atomic_write_text(folder / "report.json", json.dumps(doc, ensure_ascii=False) + "\n")
        self.stored.append(report.nodeid)

    @hookimpl
    def sft_spec_reuse_report(self, item, session):
        if item.spec.skip or _bypass(item, self.config):
            return None
        try:
            key = cache_key(item, self.config)
        except Exception as exc:  # noqa: BLE001 - e.g. --device cuda without one: the run itself reports it
            self.unkeyed.append(f"{item.nodeid}: {type(exc).__name__}: {exc}")
            return None
        self.keys[item.nodeid] = key
        report = self.load(key)
        if report is None:
            return None
        report.path = str(item.location.path)  # ids are the root's; the path is this run's working directory's
        report.cached = True
        report.metrics["cached_duration"] = report.duration
        report.duration = 0.0
        self.reused.append(item.nodeid)
        return report

    @hookimpl
    def sft_spec_log_report(self, report, session):
        key = self.keys.pop(report.nodeid, None)
        if key and not report.cached and report.outcome in CACHEABLE:
            adapter = report.extra.get(ADAPTER)
            try:
                self.store(key, report, Path(adapter) if adapter else None)
            except OSError as exc:  # a full disk must not fail the run
                self.discarded.append(f"could not store {report.nodeid}: {exc}")

    @hookimpl
    def sft_spec_terminal_summary(self, session, write_line):
        if self.reused or self.stored:
            write_line(f"result cache: {len(self.reused)} reused, {len(self.stored)} stored in {self.root} "
                       "(--no-cache to retrain)")
        for problem in self.discarded:
            write_line(f"result cache: discarded a damaged entry: {problem}")
        for problem in self.unkeyed:  # run, not cached: a contributor of the key failed
            write_line(f"result cache: not used for {problem}")


@hookimpl
def sft_spec_addoption(parser) -> None:
    parser.add_argument("--no-cache", action="store_true", dest="no_cache",
                        help="train every spec, even if an unchanged one has a cached result "
                        "(results are cached in <cache dir>/results)")


@hookimpl
def sft_spec_configure(config) -> None:
    chosen = getattr(config.options, "cache_dir", None)
    if chosen:  # --cache-dir, named on the command line: checked as every folder sft-spec writes into is
        try:
            output_path(str(chosen))
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--cache-dir: {exc}") from None
    if config.role == "main" and not config.getoption("no_cache") and not config.getoption("collect_only"):
        config.pluginmanager.register(ResultCache(config), "result_cache_store")


@hookimpl
def sft_spec_after_training(item, run) -> None:
    """Save a LoRA adapter while it is attached, so a stored result keeps what was trained: in the process
    that trained it (rank 0 of a launched run), when the result will be stored at all."""
    config = run.config
    if (item.spec.method == "full" or not hasattr(run.model, "save_pretrained") or config.getoption("no_cache")
            or config.getoption("collect_only") or _bypass(item, config) or os.environ.get("RANK", "0") != "0"):
        return
    folder = spec_output_dir(run.config, item, "cached-adapter")
    run.model.save_pretrained(str(folder), safe_serialization=True)
    run.stash[_SAVED] = str(folder)


@hookimpl(wrapper=True)
def sft_spec_make_report(item, run, report):
    report = yield
    if _SAVED in run.stash:
        report.extra[ADAPTER] = run.stash[_SAVED]
    return report


def _add_arguments(parser) -> None:
    parser.add_argument("action", choices=("clear", "info"), help="clear: remove every cached result; "
                        "info: where the cache is and how much it holds")
    parser.add_argument("--cache-dir", type=output_path, help="cache folder (default: $SFT_SPEC_CACHE or "
                        "~/.cache/sft-spec)")


def _run_command(options, pluginmanager) -> int:
    from sft_spec.config import default_cache_dir

    root = results_dir(options.cache_dir or default_cache_dir())
    entries = list(root.glob("*/*/report.json")) if root.is_dir() else []
    if options.action == "info":
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
        print(f"{root}: {len(entries)} cached results, {size / 1e6:.1f} MB")
        return 0
    shutil.rmtree(root, ignore_errors=True)
    print(f"removed {len(entries)} cached results from {root}")
    return 0


@hookimpl
def sft_spec_register_commands(register) -> None:
    register("cache", "manage the result cache (clear, info)", _add_arguments, _run_command)
