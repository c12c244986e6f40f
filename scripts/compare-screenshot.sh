#!/usr/bin/env bash
# docs/compare-screenshot.png from a real run: the example suite on main (BASE) and with the blog
# recipe's learning rate cut a hundredfold (HEAD, a planted regression), compared, shot in headless
# Chromium. Run from the repository root with the project's venv: scripts/compare-screenshot.sh
set -euo pipefail
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for run in base head; do
  mkdir -p "$work/$run"
  cp -r specs "$work/$run/specs"
  touch "$work/$run/pyproject.toml"  # each checkout's root: the ids match across the two
done
sed -i 's/learning_rate: 1.0e-2/learning_rate: 1.0e-4/' "$work/head/specs/blog-recipe.sft.yaml"
for run in base head; do
  (cd "$work/$run" && "$repo/.venv/bin/sft-spec" run specs/ -q --no-cache --json "../$run.json" || true)
done
(cd "$work" && "$repo/.venv/bin/sft-spec" compare base.json head.json --html compare.html || true)
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,1300 \
  --screenshot="$repo/docs/compare-screenshot.png" "file://$work/compare.html"
echo "wrote docs/compare-screenshot.png"
