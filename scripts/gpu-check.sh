#!/usr/bin/env bash
# The CUDA checks, run on a GPU machine from the repo root: the reference recipe's precision and
# optimizer settings (bf16, adamw_8bit), 4-bit QLoRA and a full fine-tune natively on the GPU, then
# the default suite, with --on-unsupported error so that no setting silently falls back. Packages
# the GPU machine's image lacks (trl, datasets, pydantic, pydantic-core, annotated-types,
# typing-inspection, dill, multiprocess, bitsandbytes; pytest and iniconfig if it has no pytest) travel
# as wheels in .whl/
# (git-ignored), downloaded for its Python 3.12, e.g.:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl trl==1.16.0 ...
# (datasets 4.8.4 rather than 5.x: it accepts the older pyarrow such an image may have).
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install --no-index --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 SFT_SPEC_CACHE=/tmp/sft-spec-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 - <<'PY' | tee -a "$out/gpu.txt"
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "bf16", torch.cuda.is_bf16_supported())
for d in ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"):
    print(d, m.version(d))
PY
sft-spec run examples/cuda -v --device cuda --on-unsupported error 2>&1 | tee "$out/cuda-examples.txt"
sft-spec run specs/ -v --device cuda --on-unsupported error 2>&1 | tee "$out/cuda-specs.txt"
# The same, as assertions: native bf16/adamw_8bit/4-bit on CUDA, no fallback (tests/model/test_gpu.py).
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -m gpu tests/model/test_gpu.py -v -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt"
else
  echo "pytest is not installed here: add its wheels (pytest, iniconfig) to .whl/ to run tests/model/test_gpu.py" \
    | tee "$out/pytest-gpu.txt"
fi
