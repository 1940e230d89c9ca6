#!/usr/bin/env bash
# Side by side with llama.cpp: prefill (512 tokens) and decode (128 tokens) tok/s of one GGUF model under
# llama-bench and of its kiln plan under `kiln bench`, both on 2 threads, in alternating rounds so that a busy
# machine slows both alike. Prints each round, then the medians and kiln's ratios to llama.cpp, and the spread of
# the per-round ratios (each kiln round against the llama.cpp round just before it).
#
#   scripts/compare-llama.sh MODEL.gguf PLAN.kiln [ROUNDS] [DEPTH]     (ROUNDS: default 5; DEPTH: default 0)
#
# DEPTH tokens are in the cache before each timed prefill and decode (llama-bench's -d, kiln bench's --depth).
#
# llama-bench is $LLAMA_BENCH when set; otherwise it is built once (into $KILN_LLAMA, default
# ~/.cache/kiln/llama.cpp) from the llama-cpp-python source package, which vendors llama.cpp: pip, cmake (installed
# with pip when missing) and a C++ compiler. kiln is $KILN when set, else target/release/kiln (built when missing).
set -euo pipefail

usage() { echo "usage: $0 MODEL.gguf PLAN.kiln [ROUNDS] [DEPTH]" >&2; exit 2; }
[ $# -ge 2 ] && [ $# -le 4 ] || usage
model=$1 plan=$2 rounds=${3:-5} depth=${4:-0}
[ -f "$model" ] || { echo "error: no model file $model" >&2; exit 1; }
[ -f "$plan" ] || { echo "error: no plan file $plan" >&2; exit 1; }
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "error: ROUNDS must be a positive integer, not '$rounds'" >&2; exit 1; }
[[ "$depth" =~ ^[0-9]+$ ]] || { echo "error: DEPTH must be a whole number of tokens, not '$depth'" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
llama_version=0.3.36

build_llama_bench() {
  local dir=${KILN_LLAMA:-$HOME/.cache/kiln/llama.cpp}
  local bin="$dir/llama_cpp_python-$llama_version/vendor/llama.cpp/build/bin/llama-bench"
  if [ ! -x "$bin" ]; then
    echo "building llama-bench from llama-cpp-python $llama_version (once, into $dir)..." >&2
    mkdir -p "$dir"
    command -v cmake > /dev/null || python3 -m pip install --quiet cmake >&2
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$llama_version" -d "$dir" >&2
    tar -xzf "$dir/llama_cpp_python-$llama_version.tar.gz" -C "$dir"
    local src="$dir/llama_cpp_python-$llama_version/vendor/llama.cpp"
    cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF > /dev/null
    cmake --build "$src/build" --target llama-bench -j "$(nproc)" > /dev/null
  fi
  echo "$bin"
}

llama_bench=${LLAMA_BENCH:-$(build_llama_bench)}
kiln=${KILN:-$root/target/release/kiln}
if [ ! -x "$kiln" ]; then
  echo "building kiln..." >&2
  (cd "$root" && cargo build --release --quiet)
fi

# One round of each: "prefill decode" in tok/s.
llama_round() {
  "$llama_bench" -m "$model" -t 2 -p 512 -n 128 -d "$depth" -r 1 -o json 2> /dev/null |
    python3 -c 'import json, sys; r = json.load(sys.stdin); print(" ".join("%.1f" % x["avg_ts"] for x in r))'
}
kiln_round() {
  "$kiln" bench "$plan" --threads 2 --prefill 512 --decode 128 --depth "$depth" --repeat 1 --json 2> /dev/null |
    python3 -c 'import json, sys; d = json.load(sys.stdin); print("%.1f %.1f" % (d["prefill_tok_s"]["512"], d["decode_tok_s"]))'
}

results=$(mktemp)
trap 'rm -f "$results"' EXIT
printf '%-6s %-8s %10s %10s\n' round engine prefill decode
for round in $(seq "$rounds"); do
  read -r lp ld <<< "$(llama_round)"
  read -r kp kd <<< "$(kiln_round)"
  printf '%-6s %-8s %10s %10s\n' "$round" llama.cpp "$lp" "$ld" "$round" kiln "$kp" "$kd"
  echo "$lp $ld $kp $kd" >> "$results"
done
python3 - "$results" << 'PY'
import statistics, sys
rows = [list(map(float, line.split())) for line in open(sys.argv[1])]
lp, ld, kp, kd = (statistics.median(col) for col in zip(*rows))
print(f"median  llama.cpp prefill {lp:.1f} decode {ld:.1f} | kiln prefill {kp:.1f} decode {kd:.1f} tok/s")
print(f"ratio (kiln / llama.cpp): prefill {kp / lp:.2f}x, decode {kd / ld:.2f}x over {len(rows)} rounds")
for name, llama, ours in (("prefill", 0, 2), ("decode", 1, 3)):
    ratios = sorted(row[ours] / row[llama] for row in rows)
    faster = sum(r > 1 for r in ratios)
    print(f"per-round {name} ratios: median {statistics.median(ratios):.2f}x, "
          f"{ratios[0]:.2f}x to {ratios[-1]:.2f}x, kiln faster in {faster} of {len(rows)}")
PY
