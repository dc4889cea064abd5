#!/usr/bin/env bash
# The main job end to end on the embedded demo model: set up, spawn the sidecar, load,
# stream a chat reply, print usage and speed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/localmlx demo "$@"
