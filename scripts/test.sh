#!/usr/bin/env bash
# The test suite: ruff, then pytest on 2 workers. Builds the cached venv when missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/venv.sh")"
cd "$root"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$venv/bin/ruff" check src tests benchmarks examples
"$venv/bin/python" -m pytest -n 2 -q "$@"
