#!/usr/bin/env bash
# The main job, end to end: fetch a real model, build kiln, compile the model to a plan, serve the plan over the
# OpenAI-compatible API, and answer a request.
#   scripts/demo.sh ["PROMPT"]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-What is the capital of France?}"
model=$(scripts/fetch-models.sh smollm2 | awk '{print $2}')
plan="${KILN_MODELS:-$HOME/.cache/kiln/models}/SmolLM2-135M-Instruct.Q4_1.plan"
cargo build --release --quiet
echo "== kiln compile" >&2
target/release/kiln compile "$model" -o "$plan"

echo "== kiln serve" >&2
log=$(mktemp)
target/release/kiln serve "$plan" --port 0 --model-name smollm2 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$log"' EXIT
# It listens at once and answers 503 until the model is loaded; wait for both.
for _ in $(seq 300); do grep -q "ready" "$log" && break; sleep 0.1; done
address=$(sed -n 's/^kiln serve: listening on //p' "$log")
[ -n "$address" ] || { cat "$log" >&2; exit 1; }

echo "== POST $address/v1/chat/completions: \"$prompt\"" >&2
body=$(printf '{"model": "smollm2", "messages": [{"role": "user", "content": "%s"}], "max_tokens": 48, "temperature": 0}' "$prompt")
curl -sS --fail-with-body "$address/v1/chat/completions" -H 'content-type: application/json' -d "$body"
echo
