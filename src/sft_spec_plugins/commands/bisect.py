"""``sft-spec bisect SPEC --package NAME``: the first release of a library that breaks a spec.

Users bisect library releases by hand (peft #2043, transformers #28316, LlamaFactory #2983). Given a spec
that passes with the version of NAME in BASE's results and fails with HEAD's (or ``--good``/``--bad``),
this lists the releases in between on the package index the machine reaches (``pip index versions``,
with ``--index-url``/``--find-links``), and binary-searches them: each candidate is installed into a
throwaway virtual environment of its own (``python -m venv``, then ``pip install --no-deps
--ignore-installed NAME==VERSION``), which sees every other package of this environment through a ``.pth``
file and shadows only NAME; the spec runs there (``sft-spec run SPEC --no-cache --json``); the first
release whose run fails is named, with both verdicts and the evidence. The environments are kept under
the cache folder (``bisect/``), so a second bisection reuses them; this environment is never modified.

Cost: one environment per release tried (a second or two, plus the download of that release, once), and
one run of the spec per release tried: about log2(releases) + 2 runs (both ends are run first, to check
that the good one passes and the bad one fails).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Trial:
    version: str
    outcome: str  # the spec's outcome with this release, or "error" when it could not be run
    evidence: str  # what failed (the failing checks, or why the run did not happen)

    @property
    def good(self) -> bool:
        return self.outcome in ("passed", "xfailed")


def _index_options(options) -> list[str]:
    out = []
    if options.index_url:
        out += ["--index-url", options.index_url]
    for link in options.find_links or []:
        out += ["--find-links", link]
    if options.no_index:
        out.append("--no-index")
    return out


def releases(package: str, index: list[str]) -> list[str]:
    """The versions of ``package`` the index offers, oldest first (``pip index versions``)."""
    from packaging.version import InvalidVersion, Version

    done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package, *index, "--pre"],
                          capture_output=True, text=True, timeout=300)
    match = re.search(r"Available versions:\s*(.+)", done.stdout)
    if done.returncode != 0 or not match:
        raise UsageError(f"bisect: the package index has no release of {package!r}: "
                         f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no answer']}")
    found = []
    for text in match.group(1).split(","):
        try:
            found.append(Version(text.strip()))
        except InvalidVersion:
            continue
    return [str(v) for v in sorted(set(found))]


def between(versions: list[str], good: str, bad: str) -> list[str]:
    """``good``, the releases strictly between, and ``bad``, in version order."""
    from packaging.version import Version

    low, high = Version(good), Version(bad)
    if not low < high:
        raise UsageError(f"bisect: the good version {good} must be older than the bad one {bad}")
    return [good, *(v for v in versions if low < Version(v) < high), bad]


def _site_packages(environment: Path) -> Path:
    purelib = sysconfig.get_path("purelib", vars={"base": str(environment), "platbase": str(environment)})
    return Path(purelib)


def environment_for(package: str, version: str, cache: Path, index: list[str]) -> Path:
    """A virtual environment in which ``package`` is ``version`` and everything else is this environment's
    (a ``.pth`` file adds this environment's site-packages after its own); made once, then reused."""
    folder = cache / "bisect" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', package)}-{version}"
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    marker = folder / "sft-spec-bisect.json"
    if marker.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(folder)], check=True,
                   capture_output=True, timeout=300)
    parents = [p for p in dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]) if p]
    site = _site_packages(folder)
    site.mkdir(parents=True, exist_ok=True)
    # addsitedir, not a bare path: this environment's own .pth files (editable installs) are processed too.
    (site / "zz-sft-spec-parent.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents), encoding="utf-8")
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed",
                           "--disable-pip-version-check", "--prefix", str(folder), f"{package}=={version}", *index],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"pip could not install {package}=={version}: "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
    marker.write_text(json.dumps({"package": package, "version": version}), encoding="utf-8")
    return python


def run_spec(python: Path, spec: Path, package: str, version: str, work: Path, extra: list[str]) -> Trial:
    """The spec in that environment: its outcome and, when it failed, what failed."""
    seen = subprocess.run([str(python), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
                          capture_output=True, text=True, timeout=120)
    if seen.stdout.strip() != version:
        return Trial(version, "error", f"the environment has {package} {seen.stdout.strip() or '?'}, not {version}: "
                     f"{seen.stderr.strip()[-300:]}")
    out = work / f"{version}.json"
    done = subprocess.run([str(python), "-m", "sft_spec", "run", str(spec), "--no-cache", "--json", str(out), "-q",
                           *extra], capture_output=True, text=True, cwd=spec.parent, timeout=7200)
    if not out.is_file():
        return Trial(version, "error", f"the run wrote no results (exit {done.returncode}): "
                     f"{(done.stderr or done.stdout).strip()[-500:]}")
    doc = json.loads(out.read_text(encoding="utf-8"))
    specs = doc.get("specs") or []
    if not specs:
        return Trial(version, "error", "the run collected no spec")
    outcome = "passed" if all(s.get("outcome") in ("passed", "xfailed") for s in specs) else next(
        s.get("outcome") for s in specs if s.get("outcome") not in ("passed", "xfailed"))
    failures = [f"{case['nodeid']}: {check['name']}: {check.get('message', '')}" for s in specs
                for case in s.get("expectations", []) + s.get("training_checks", []) for check in case.get("checks", [])
                if not check.get("passed")]
    errors = [f"{s['nodeid']}: {(s.get('error') or {}).get('message', '')}" for s in specs if s.get("error")]
    return Trial(version, outcome, "; ".join(errors + failures)[:1000])


def bisect(candidates: list[str], trial) -> tuple[list[Any], Any, Any]:
    """Binary search for the first bad release: ``candidates[0]`` must be good and ``candidates[-1]`` bad."""
    tried = {}

    def verdict(index: int):
        if index not in tried:
            tried[index] = trial(candidates[index])
        return tried[index]

    first, last = verdict(0), verdict(len(candidates) - 1)
    if not first.good or last.good:
        return [tried[i] for i in sorted(tried)], None, None
    low, high = 0, len(candidates) - 1  # low is good, high is bad
    while high - low > 1:
        middle = (low + high) // 2
        if verdict(middle).good:
            low = middle
        else:
            high = middle
    return [tried[i] for i in sorted(tried)], verdict(low), verdict(high)


def _versions_from(path: Path | None, package: str) -> str | None:
    if path is None:
        return None
    from ..report.json_report import load_document

    meta, _ = load_document(path)
    environment = meta.get("environment") or {}
    found = {**(environment.get("plugins") or {}), **(environment.get("packages") or {})}
    version = found.get(package)
    return version if isinstance(version, str) else None


def _arguments(parser) -> None:
    parser.add_argument("spec", type=Path, metavar="SPEC.sft.yaml", help="the spec that passes with the good "
                        "release and fails with the bad one")
    parser.add_argument("--package", required=True, help="the library to bisect (a distribution name)")
    parser.add_argument("--good", help="a release with which the spec passes (default: BASE's)")
    parser.add_argument("--bad", help="a release with which the spec fails (default: HEAD's)")
    parser.add_argument("--base", type=Path, metavar="BASE.json", help="results whose version of the package is "
                        "the good one")
    parser.add_argument("--head", type=Path, metavar="HEAD.json", help="results whose version is the bad one")
    parser.add_argument("--index-url", help="the package index (default: pip's)")
    parser.add_argument("--find-links", action="append", metavar="URL_OR_DIR", help="more places to find releases")
    parser.add_argument("--no-index", action="store_true", help="only --find-links")
    parser.add_argument("--cache-dir", type=Path, help="where the environments are kept (default: the cache folder)")
    parser.add_argument("--run-arg", action="append", default=[], metavar="ARG",
                        help="an option for each `sft-spec run` (e.g. --run-arg=--device=cpu)")


def _run(options, pluginmanager) -> int:
    import tempfile

    from sft_spec.config import default_cache_dir

    package = options.package
    if not _NAME.match(package):
        raise UsageError(f"bisect: {package!r} is not a package name")
    if not options.spec.is_file():
        raise UsageError(f"bisect: no spec file {options.spec}")
    good = options.good or _versions_from(options.base, package)
    bad = options.bad or _versions_from(options.head, package)
    if not good or not bad:
        raise UsageError(f"bisect: which releases of {package}? Give --good and --bad, or --base and --head "
                         "results files that record its version")
    index = _index_options(options)
    candidates = between(releases(package, index), good, bad)
    if len(candidates) == 2:
        raise UsageError(f"bisect: the package index has no release of {package} between {good} and {bad}: nothing "
                         f"to bisect ({bad} is the first bad release, if the spec passes with {good} and fails "
                         f"with {bad})")
    cache = Path(options.cache_dir or default_cache_dir())
    spec = options.spec.resolve()
    print(f"bisect {package}: {len(candidates)} releases from {good} (good) to {bad} (bad); about "
          f"{max(1, (len(candidates) - 1).bit_length()) + 2} runs of {options.spec}")
    with tempfile.TemporaryDirectory(prefix="sft-spec-bisect-") as work:
        def trial(version: str) -> Trial:
            try:
                python = environment_for(package, version, cache, index)
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                result = Trial(version, "error", str(exc))
            else:
                result = run_spec(python, spec, package, version, Path(work), options.run_arg)
            print(f"  {package} {version}: {result.outcome}" + (f" ({result.evidence[:300]})" if not result.good
                                                                  and result.evidence else ""))
            return result

        tried, last_good, first_bad = bisect(candidates, trial)
    if first_bad is None:
        ends = {t.version: t for t in tried}
        raise UsageError(f"bisect: the ends do not bracket a break: {good} -> {ends[good].outcome}, {bad} -> "
                         f"{ends[bad].outcome} (the good release must pass and the bad one fail)")
    print(f"first bad release: {package} {first_bad.version} ({first_bad.outcome}; the release before, "
          f"{last_good.version}, {last_good.outcome})")
    print(f"evidence: {first_bad.evidence or '-'}")
    return 0


@hookimpl
def sft_spec_register_commands(register):
    register("bisect", "find the first release of a library that breaks a spec (throwaway environments)",
             _arguments, _run)
