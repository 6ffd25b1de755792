#!/usr/bin/env bash
# A real converted checkpoint (e.g. SmolLM2-135M from `superweight convert`) served on the GPU machine: WikiText-2
# perplexity through vLLM (superweight eval, eager), with and without the exact corrections, to compare with the
# CPU numbers in benchmarks/results/quality.json. The checkpoint travels split in parts (64 MiB per run):
#   locally:  split -b 58000000 -d CKPT/model.safetensors .gpu-ckpt/part-  (parts in .gpu-ckpt/p1, p2; the small
#             files + wiki.test.raw in .gpu-ckpt/meta, with parts.sha256: sha256sum of the parts by their bare names;
#             meta travels on its own call: p2 + meta + the tree is over the 64 MiB a call carries)
#   run 1:    carry [.gpu-ckpt/p1]                 command: bash benchmarks/gpu_eval_ckpt.sh stash
#   run 2:    carry [.gpu-ckpt/p2, .gpu-ckpt/meta, .gpu-bundle/install.sh]
#                                                  command: bash benchmarks/gpu_eval_ckpt.sh stash eval NAME
#   then:     bash benchmarks/gpu_eval_ckpt.sh m1 [RUNS]   single-token decoding of the same checkpoint under each W4
#             kernel mode (benchmarks/gpu_parallel.py's m1-* runs: greedy tokens and per-step log-probabilities against
#             Marlin at one token) -> $OUT/gpu_m1.json; M1_END_S (default 575): the call's second by which it ends
# The W4 kernel mode of `eval` comes from the environment (e.g. SUPERWEIGHT_W4_KERNEL=humming-gemv MODES=on).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu-out}
CK=/root/sw-ckpt
mkdir -p "$OUT" "$CK"
if [ "${1:-}" = stash ]; then
  for d in .gpu-ckpt/p1 .gpu-ckpt/p2 .gpu-ckpt/meta; do [ -d "$d" ] && cp -f "$d"/* "$CK"/; done
  ls -la "$CK"
  shift
fi
ready() {
  [ -n "${READY:-}" ] && return 0
  READY=1
  # the parts joined once (a second eval in the same lease finds them joined), and only when every part listed in
  # meta's parts.sha256 is there and whole: session 27 joined one part of two (the other was on a released machine)
  # and deleted it, which cost a lease two re-carries
  if ls "$CK"/part-* >/dev/null 2>&1; then
    if [ -f "$CK/parts.sha256" ] && ! (cd "$CK" && sha256sum --quiet -c parts.sha256); then
      echo "checkpoint parts missing or incomplete (stash .gpu-ckpt/p1 and p2 first): $(ls "$CK")"; exit 2
    fi
    cat "$CK"/part-* > "$CK/model.safetensors.tmp" && mv "$CK/model.safetensors.tmp" "$CK/model.safetensors" \
      && rm -f "$CK"/part-*
  fi
  [ -f "$CK/model.safetensors" ] || { echo "no checkpoint in $CK: stash .gpu-ckpt/p1, p2 and meta first"; exit 2; }
  bash benchmarks/gpu_run.sh setup > "$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 2; }
  # shellcheck disable=SC1091
  source .gpu-bundle/install.sh
  export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
  # vLLM's Humming backend where setup installed it (.gpu-bundle/humming carried once), as on a user's machine
  # with vllm-superweight[humming]: taken with SUPERWEIGHT_W4_KERNEL=humming / humming-gemv
  [ -d /root/stash/hm-site/humming ] && export PYTHONPATH=$PYTHONPATH:/root/stash/hm-site
  return 0
}
if [ "${1:-}" = eval ]; then
  NAME=${2:-ckpt}
  ready
  for mode in ${MODES:-on off}; do
    env $([ $mode = off ] && echo SUPERWEIGHT_DISABLE_CORRECTION=1) python3 -m vllm_superweight.eval "$CK" \
      --window 512 --max-tokens 16384 --data "$CK/wiki.test.raw" --json "$OUT/gpu_eval_${NAME}_correction-$mode.json" \
      --no-progress > "$OUT/gpu_eval_${NAME}_correction-$mode.log" 2>&1
    echo "correction $mode: rc=$? $(grep -o '"ppl": [0-9.e+]*' "$OUT/gpu_eval_${NAME}_correction-$mode.json" 2>/dev/null)"
    grep -i "superweight_rtn\|kernel\|Error" "$OUT/gpu_eval_${NAME}_correction-$mode.log" | grep -v "^$" | tail -4
  done
  shift 2 || true
fi
if [ "${1:-}" = m1 ]; then
  ready
  python3 benchmarks/gpu_parallel.py --models smollm2 --smollm2 "$CK" --out "$OUT/gpu_m1.json" \
    --runs "${2:-m1-marlin,m1-gemv,m1-humming,m1-humming-gemv}" --budget-s "$((${M1_END_S:-575} - SECONDS))" --timeout 200 \
    2>&1 | grep -E "^\[" | tail -12
fi
