#!/usr/bin/env bash
# Regenerate node-client/src/protocol.ts from protocol/schema/protocol.schema.json.
#   scripts/gen-types.sh           rewrite it
#   scripts/gen-types.sh --check   exit 1 when the checked-in file has drifted from the schema
set -euo pipefail
cd "$(dirname "$0")/../node-client"
[ -d node_modules ] || npm ci --no-audit --no-fund
if [ "${1:-}" = "--check" ]; then
  exec npm run --silent check:types
fi
exec npm run --silent gen:types
