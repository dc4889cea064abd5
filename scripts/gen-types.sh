#!/usr/bin/env bash
# Regenerate what is generated from protocol/schema/protocol.schema.json (the single source of
# truth): node-client/src/protocol.ts (node-client/scripts/gen-types.ts), and
# sidecar/protocol_defs.py plus the error table of protocol/PROTOCOL.md (scripts/gen_protocol_defs.py).
#   scripts/gen-types.sh           rewrite them
#   scripts/gen-types.sh --check   exit 1 when a checked-in file has drifted from the schema
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
if [ "${1:-}" = "--check" ]; then
  status=0
  "$python" "$root/scripts/gen_protocol_defs.py" --check || status=1
  (cd "$root/node-client" && { [ -d node_modules ] || npm ci --no-audit --no-fund; } && npm run --silent check:types) || status=1
  exit $status
fi
"$python" "$root/scripts/gen_protocol_defs.py"
cd "$root/node-client"
[ -d node_modules ] || npm ci --no-audit --no-fund
exec npm run --silent gen:types
