#!/usr/bin/env bash
# The main job, end to end: fetch a real model, build kiln, run it on a prompt.
#   scripts/demo.sh ["PROMPT"]
# (Compiling to a plan file and serving it over HTTP join this script as those commands land.)
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-The capital of France is}"
model=$(scripts/fetch-models.sh smollm2 | awk '{print $2}')
cargo build --release --quiet
echo "== kiln inspect (summary)" >&2
target/release/kiln inspect "$model" | head -n 3
echo "== kiln run -p \"$prompt\"" >&2
target/release/kiln run "$model" -p "$prompt" -n 32 --temp 0
