#!/usr/bin/env bash
# The fuzz and soak suite in its long mode: minutes instead of the seconds CI spends on it.
#
#   bash scripts/soak.sh                          # everything in tests/test_fuzz.py and tests/test_soak.py
#   bash scripts/soak.sh -k hostile               # extra pytest arguments pass through
#   LOCALMLX_SOAK_SEED=7 bash scripts/soak.sh     # another (still reproducible) set of cases
#   LOCALMLX_SOAK_LINES=1000000 bash scripts/soak.sh -k hostile   # a longer hostile mix
#
# LOCALMLX_SOAK=long scales every count up: hypothesis examples (thousands per property),
# the hostile mix (300,000 lines instead of 100,000), the streamed soak (4,000 requests
# instead of 400) and the burst beyond the queue limit (500 chats instead of 50). The
# normal `pytest` run (scripts/test.sh, CI) runs the same tests in the short mode.
# Timings are printed per test (--durations), with each test's own figures (-s).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export LOCALMLX_SOAK=long
exec .venv/bin/python -m pytest -p no:cacheprovider -v -s --durations=0 \
  tests/test_fuzz.py tests/test_soak.py "$@"
