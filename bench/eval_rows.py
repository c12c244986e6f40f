"""One eval set measured on the built-in model, batched or one row at a time (used by bench/run.py).

    python bench/eval_rows.py ROWS {batched,single} OUT.json

Writes the seconds taken, the peak memory growth and every row's answer and scores, so bench/run.py can
check that batching changes the time and nothing else.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

SPEC = """\
model: builtin:tiny-gemma
generation: {{batch_size: {batch}}}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
eval:
  rows:
    path: rows.jsonl
    prompt: question
    reference: answer
    checks: {{equals: "{{reference}}", chrf: {{}}, likelihood: {{}}}}
"""


def main(rows: int, mode: str, out: str) -> None:
    from sft_spec.bootstrap import prepare_config
    from sft_spec.loading import LoadContext, load_spec_file
    from sft_spec.state import SpecRun
    from sft_spec_plugins.check.eval_sets import measure

    folder = Path(tempfile.mkdtemp(prefix="sft-spec-bench-eval-"))
    with (folder / "rows.jsonl").open("w", encoding="utf-8") as f:
        for i in range(rows):  # prompts of different lengths, so batches really are padded
            f.write(json.dumps({"question": f"问题{'长' * (i % 7)}{i}", "answer": f"答案{i % 13}"},
                               ensure_ascii=False) + "\n")
    batched = mode == "batched"
    (folder / "b.sft.yaml").write_text(SPEC.format(batch=64 if batched else 1), encoding="utf-8")
    config = prepare_config(["run", str(folder), "--device", "cpu"], output_dir=folder / "out").config
    item = load_spec_file(folder / "b.sft.yaml", LoadContext(config))[0]
    run = SpecRun(item=item, config=config)
    run.loaded = config.hook.sft_spec_load_model(item=item, config=config)
    run.model = run.loaded.model
    run.markers = config.hook.sft_spec_chat_markers(item=item, run=run)
    if not batched:  # every check one row at a time: what a loop over rows without batching costs
        for check in config.registry.checks.values():
            check.batch = None
    evalset = item.training_checks[0].argument
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    results = measure(item, run, evalset, "after")
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    Path(out).write_text(json.dumps({
        "seconds": seconds, "peak_growth_mib": grown,
        "rows": [[r.answer, r.scores.get("chrf"), r.scores.get("likelihood")] for r in results],
    }), encoding="utf-8")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
