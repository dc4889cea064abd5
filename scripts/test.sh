#!/usr/bin/env bash
# All tests: the Python suite (unit, conformance, behaviour) and the node client's suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# CI only, as root: OpenSSH's server, for the group test over real SSH (tests/sshd.py; it is
# skipped without one). Not in setup.sh: nobody's Mac or PC should get an SSH server that way.
if [ "${CI:-}" = true ] && [ "$(id -u)" -eq 0 ] && [ ! -x /usr/sbin/sshd ] && command -v apt-get >/dev/null 2>&1; then
  install_sshd="env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server"
  $install_sshd >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && $install_sshd >/dev/null 2>&1; } \
    || echo "test: could not install openssh-server; the group test over real SSH is skipped" >&2
fi
status=0
.venv/bin/ruff check sidecar tests scripts || status=$?
.venv/bin/mypy || status=$?  # [tool.mypy] in pyproject.toml: strict on sidecar/
.venv/bin/python -m pytest -q "$@" || status=$?
if [ -f node-client/package.json ]; then
  (cd node-client && LOCALMLX_PYTHON="$PWD/../.venv/bin/python" npm test) || status=$?
fi
exit $status
