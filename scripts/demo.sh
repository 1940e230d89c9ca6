#!/usr/bin/env bash
# The main job, end to end: fetch a real model, build kiln, compile the model to a plan, run the plan.
#   scripts/demo.sh ["PROMPT"]
# (Serving the plan over HTTP joins this script when `kiln serve` lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-The capital of France is}"
model=$(scripts/fetch-models.sh smollm2 | awk '{print $2}')
plan="${KILN_MODELS:-$HOME/.cache/kiln/models}/SmolLM2-135M-Instruct.Q4_1.plan"
cargo build --release --quiet
echo "== kiln compile" >&2
target/release/kiln compile "$model" -o "$plan"
echo "== kiln inspect (summary)" >&2
target/release/kiln inspect "$plan" | head -n 5
echo "== kiln run -p \"$prompt\"" >&2
target/release/kiln run "$plan" -p "$prompt" -n 32 --temp 0
