#!/usr/bin/env bash
# Print the path of a venv with dynlrp's pinned test dependencies, building it when missing.
# The venv lives outside the clone, under ~/.cache/dynlrp/, keyed by a hash of the pins,
# so every clone (and CI) on this machine reuses it. dynlrp itself is put on the path by
# a .pth file pointing at this clone's src/, refreshed on every call (cheap).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pins="$root/requirements/test.txt"
key="$( (cat "$pins"; python3 --version) | sha256sum | cut -c1-16)"
cache="${DYNLRP_CACHE:-$HOME/.cache/dynlrp}"
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "dynlrp: building the test venv at $venv (several minutes, once per pin set)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -r "$pins" >&2
  touch "$venv/.complete"
fi
# Point the venv at this clone: the package (src/) and its console script.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$root/src" > "$site/dynlrp-clone.pth"
cat > "$venv/bin/dynlrp" <<SH
#!$venv/bin/python
import sys
from dynlrp.cli import main
sys.exit(main())
SH
chmod +x "$venv/bin/dynlrp"
echo "$venv"
