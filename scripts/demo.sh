#!/usr/bin/env bash
# The main job end to end on the embedded demo model, the way Wooster runs it: set up, then
# the TypeScript client spawns the sidecar, initializes, loads the model (with progress),
# streams a chat reply token by token and prints usage and speed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if command -v npm >/dev/null 2>&1; then
  cd node-client
  exec env LOCALMLX_PYTHON="$PWD/../.venv/bin/python" npm run --silent demo -- "$@"
fi
echo "npm not found: running the Python demo client instead (Node 20+ runs the TypeScript one)" >&2
exec .venv/bin/localmlx demo "$@"
