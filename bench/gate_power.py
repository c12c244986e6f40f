"""The gate measured: how often `sft-spec compare --fail-on-regression` fails a change that broke nothing
(false alarms) and how often it catches one that did (detection), for today's fixed-tolerance gate and for
the noise-aware one, at 1, 2 and 3 seeds per run, side by side in one run.

    python bench/gate_power.py                 # about 30 minutes on 2 cores (150 trainings)
    python bench/gate_power.py --quick         # fewer seeds: a smoke test of the bench itself

The recipe: a LoRA fine-tune of builtin:tiny-gemma on 50 question/answer pairs, evaluated on the same 50
prompts (an eval set of 50 rows: equals and chrF). Every training is one seed; a k-seed run is k of them
put together by `repeat:`'s own code (src/sft_spec_plugins/run/repeat.py). No-change pairs are two runs of the unchanged
recipe with different seeds; each planted regression is a run of a broken recipe against an unchanged run,
with different seeds too:

- ``lr/10``: the learning rate divided by 10;
- ``mask``: the answer's first two tokens carry no loss (a response template matched late);
- ``eot``: the end of turn and EOS carry no loss;
- ``q_proj``: LoRA on q_proj only instead of q/k/v/o;
- ``eval template``: another chat template at evaluation than at training.

Today's gate: a drop of the pooled point estimate past ``--tolerance pass_rate=0.05`` or ``mean_chrf=2``,
or a case that went passed -> failed. The new gate: the verdicts of ``compare``
(src/sft_spec_plugins/common/uncertainty.py),
its default margins, alpha 0.05 with Holm, and the same outcome transitions.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: 50 question/answer pairs: an English word, and the Chinese word for it.
PAIRS = [("apple", "苹果"), ("banana", "香蕉"), ("orange", "橘子"), ("grape", "葡萄"), ("melon", "西瓜"),
         ("berry", "草莓"), ("peach", "桃子"), ("pear", "梨子"), ("cherry", "樱桃"), ("lemon", "柠檬"),
         ("mango", "芒果"), ("pineapple", "菠萝"), ("pomegranate", "石榴"), ("blueberry", "蓝莓"),
         ("coconut", "椰子"), ("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"),
         ("purple", "紫色"), ("white", "白色"), ("black", "黑色"), ("amber", "橙色"), ("pink", "粉色"),
         ("gray", "灰色"), ("beijing", "北京"), ("shanghai", "上海"), ("guangzhou", "广州"), ("shenzhen", "深圳"),
         ("hangzhou", "杭州"), ("nanjing", "南京"), ("chengdu", "成都"), ("xian", "西安"), ("wuhan", "武汉"),
         ("tianjin", "天津"), ("tiger", "老虎"), ("lion", "狮子"), ("elephant", "大象"), ("panda", "熊猫"),
         ("monkey", "猴子"), ("rabbit", "兔子"), ("dog", "小狗"), ("cat", "小猫"), ("camel", "骆驼"),
         ("dolphin", "海豚"), ("spring", "春天"), ("summer", "夏天"), ("autumn", "秋天"), ("winter", "冬天"),
         ("morning", "早晨")]
RECIPE = """\
model: builtin:tiny-gemma
method: lora
lora: {{r: 16, lora_alpha: 32, target_modules: {targets}}}
training: {{num_train_epochs: {epochs}, learning_rate: {lr}, per_device_train_batch_size: 8}}
tags: [{tags}]
data:
  files: [{{path: pairs.jsonl}}]
eval:
  golden:
    path: rows.jsonl
    id: id
    prompt: question
    reference: answer
    checks: {{equals: "{{reference}}", chrf: {{}}}}
    pass_rate: {{at_least: 0.2}}
matrix:
{matrix}
"""
LR = 1.0e-2
KINDS = {  # name: (learning rate, LoRA targets, tags)
    "unchanged": (LR, "[q_proj, k_proj, v_proj, o_proj]", ""),
    "lr/10": (LR / 10, "[q_proj, k_proj, v_proj, o_proj]", ""),
    "mask": (LR, "[q_proj, k_proj, v_proj, o_proj]", "plant-mask"),
    "eot": (LR, "[q_proj, k_proj, v_proj, o_proj]", "plant-eot"),
    "q_proj": (LR, "[q_proj]", ""),
    "eval template": (LR, "[q_proj, k_proj, v_proj, o_proj]", "plant-eval-template"),
}


def write_project(folder: Path, seeds: dict[str, list[int]], epochs: int) -> None:
    (folder / "pyproject.toml").write_text("[project]\nname = 'gate-power'\n", encoding="utf-8")
    pairs = PAIRS
    (folder / "pairs.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n"
        for q, a in pairs), encoding="utf-8")
    (folder / "rows.jsonl").write_text("".join(json.dumps({"id": f"w{i}", "question": q, "answer": a},
                                                          ensure_ascii=False) + "\n" for i, (q, a) in enumerate(pairs)),
                                       encoding="utf-8")
    for number, (kind, (lr, targets, tags)) in enumerate(KINDS.items()):
        matrix = "\n".join(f"  - {{id: s{seed}, training: {{seed: {seed}}}}}" for seed in seeds[kind])
        (folder / f"k{number}.sft.yaml").write_text(RECIPE.format(lr=lr, targets=targets, tags=tags, epochs=epochs,
                                                                  matrix=matrix), encoding="utf-8")


def train_everything(folder: Path) -> tuple[dict, dict[str, dict[int, object]], float]:
    """One `sft-spec run` over every kind and seed; the reports by kind and seed, and the wall time."""
    out = folder / "all.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run([str(BIN / "sft-spec"), "run", str(folder), "--no-cache", "-p", "gate_plants", "--json",
                           str(out), "-q"], capture_output=True, text=True, env=env, cwd=folder)
    elapsed = time.perf_counter() - start
    if not out.is_file():
        raise SystemExit(f"the run wrote no results ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    from sft_spec_plugins.report.json_report import load_document

    meta, reports = load_document(out)
    by_kind: dict[str, dict[int, object]] = {kind: {} for kind in KINDS}
    for report in reports:
        kind = list(KINDS)[int(Path(report.path).name[1:].split(".")[0])]
        by_kind[kind][int(report.settings["training"]["seed"])] = report
    return meta, by_kind, elapsed


def canonical(report, nodeid: str = "recipe.sft.yaml::recipe"):
    """The report under one id, whatever its kind and seed, so BASE and HEAD match as one spec."""
    report = copy.deepcopy(report)
    old = report.nodeid
    report.nodeid, report.variant = nodeid, None

    def renamed(text: str) -> str:
        return nodeid + text[len(old):] if text.startswith(old) else text

    for case in report.cases:
        case.nodeid = renamed(case.nodeid)
    report.eval_sets = {renamed(k): v for k, v in report.eval_sets.items()}
    return report


def combined(item, reports: list, seeds: list[int]):
    """k one-seed reports as one `repeat:` report, by repeat's own code."""
    from sft_spec_plugins.run.repeat import RepeatSpec, combine

    return combine(item, RepeatSpec(seeds=seeds, pass_rate=0.5), [(seed, canonical(r)) for seed, r in
                                                                   zip(seeds, reports, strict=True)])


def old_gate(base, head) -> bool:
    """Today's gate: a case passed -> failed, or a pooled point estimate past its fixed tolerance."""
    from sft_spec_plugins.report.compare import BROKEN, HELD

    def aggregates(report) -> dict[str, float]:
        return next(iter(report.eval_sets.values()))["aggregates"]

    cases = {c.nodeid: c.outcome for c in base.cases}
    if any(cases.get(c.nodeid) in HELD and c.outcome in BROKEN for c in head.cases):
        return True
    a, b = aggregates(base), aggregates(head)
    return a["pass_rate"] - b["pass_rate"] > 0.05 or a.get("mean_chrf", 0) - b.get("mean_chrf", 0) > 2


def new_gate(meta, base, head) -> bool:
    from sft_spec_plugins.report.compare import compare_reports

    regressions = compare_reports(meta, [base], meta, [head]).regressions
    if regressions and os.environ.get("GATE_POWER_DEBUG"):
        print("  alarm:", "; ".join(regressions)[:400])
    return bool(regressions)


def chunks(values: list[int], size: int) -> list[list[int]]:
    return [values[i:i + size] for i in range(0, len(values) - size + 1, size)]


def rate(hits: list[bool]) -> str:
    return f"{100 * sum(hits) / len(hits):.0f}% ({sum(hits)}/{len(hits)})" if hits else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 unchanged and 3 broken seeds per kind")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=40, help="no-change pairs per seed count (at most)")
    parser.add_argument("--broken-seeds", type=int, default=24, help="seeds trained per planted regression")
    options = parser.parse_args()
    base_seeds = 6 if options.quick else 30
    broken_seeds = 3 if options.quick else options.broken_seeds
    seeds = {"unchanged": list(range(1, base_seeds + 1))}
    for i, kind in enumerate(list(KINDS)[1:]):
        seeds[kind] = list(range(1000 * (i + 1), 1000 * (i + 1) + broken_seeds))
    with tempfile.TemporaryDirectory(prefix="sft-spec-gate-power-") as tmp:
        folder = Path(tmp)
        write_project(folder, seeds, options.epochs)
        meta, by_kind, elapsed = train_everything(folder)
        from sft_spec.bootstrap import prepare_config
        from sft_spec.loading import LoadContext, load_spec_file

        config = prepare_config(["validate", str(folder)], output_dir=folder / "out").config
        item = load_spec_file(folder / "k0.sft.yaml", LoadContext(config))[0]
    trainings = sum(len(v) for v in by_kind.values())
    per_seed = statistics.fmean(r.duration for kind in by_kind.values() for r in kind.values())
    unchanged = [by_kind["unchanged"][s].eval_sets for s in seeds["unchanged"]]
    rates = [next(iter(e.values()))["aggregates"]["pass_rate"] for e in unchanged]
    print(f"{trainings} trainings of 1 seed each in {elapsed:.0f} s ({per_seed:.1f} s per seed, whole run "
          f"{elapsed / trainings:.1f} s); the unchanged recipe passed {min(rates):.0%} to {max(rates):.0%} of its 50 "
          f"rows across {len(rates)} seeds (median {statistics.median(rates):.0%})")
    planted = list(KINDS)[1:]
    header = ["gate", "seeds per run", "false alarms", *planted, "cost per comparison"]
    rows = []
    for k in (1, 2, 3):
        base_groups = chunks(seeds["unchanged"], k)
        if len(base_groups) < 2:
            continue
        bases = [combined(item, [by_kind["unchanged"][s] for s in group], group) for group in base_groups]
        pairs = list(itertools.combinations(range(len(bases)), 2))
        random.Random(0).shuffle(pairs)
        pairs = pairs[:options.pairs]
        heads = {kind: [combined(item, [by_kind[kind][s] for s in group], group)
                        for group in chunks(seeds[kind], k)] for kind in planted}
        for name, gate in (("today (fixed tolerance)", lambda b, h: old_gate(b, h)),
                           ("noise-aware (verdicts)", lambda b, h: new_gate(meta, b, h))):
            alarms = [gate(bases[i], bases[j]) for i, j in pairs]
            found = {kind: [gate(bases[t % len(bases)], head) for t, head in enumerate(heads[kind])]
                     for kind in planted}
            rows.append([name, str(k), rate(alarms), *(rate(found[kind]) for kind in planted),
                         f"{2 * k} seeds x {per_seed:.1f} s = {2 * k * per_seed:.0f} s"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print("goal: false alarms at most 5%, every planted regression detected in at least 90% of its trials, "
          "at 3 seeds or fewer")


if __name__ == "__main__":
    main()
