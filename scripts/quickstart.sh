#!/usr/bin/env bash
# The main job: explain a small CNN end to end and write the relevance to a file.
# Builds the cached venv when missing. Usage: bash scripts/quickstart.sh [OUT_DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/venv.sh")"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" "$root/examples/quickstart.py" "${1:-$root/out}"
