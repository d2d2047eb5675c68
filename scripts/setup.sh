#!/usr/bin/env bash
# Create .venv and install autopar with its test extra. torch is pinned to the local CPU wheel first:
# an unpinned torch would download a multi-GB CUDA build. Re-running is cheap (stamp on pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.autopar-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
