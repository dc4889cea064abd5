#!/usr/bin/env bash
# All tests: the Python suite (unit, conformance, behaviour) and the node client's suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
status=0
.venv/bin/ruff check sidecar tests scripts || status=$?
.venv/bin/mypy || status=$?  # [tool.mypy] in pyproject.toml: strict on sidecar/
.venv/bin/python -m pytest -q "$@" || status=$?
if [ -f node-client/package.json ]; then
  (cd node-client && LOCALMLX_PYTHON="$PWD/../.venv/bin/python" npm test) || status=$?
fi
exit $status
