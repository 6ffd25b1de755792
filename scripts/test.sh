#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): set up (once), the linters (ruff check, ruff format --check,
# mypy on the modules pyproject.toml lists), then the whole CPU test suite, slow tests (real
# SmolLM2, real vLLM engines and servers) included. GPU tests are skipped here (no CUDA).
#   bash scripts/test.sh [pytest args]    e.g. -m "not slow" for the fast subset
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup-env.sh 2> >(grep -v "^WARNING: Location" >&2)
source scripts/env.sh
echo "[test] ruff check, ruff format --check, mypy" >&2
ruff check --quiet .
ruff format --check --quiet .
mypy
exec python -m pytest -ra --durations=15 "$@"
