#!/usr/bin/env bash
# Create .venv and install localmlx with its test tools (and the node client when npm exists).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" >&2
if [ -f node-client/package.json ] && command -v npm >/dev/null 2>&1; then
  (cd node-client && npm ci --no-audit --no-fund --loglevel=error >&2 && npm run --silent build >&2)
fi
