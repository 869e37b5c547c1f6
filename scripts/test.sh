#!/usr/bin/env bash
# README command (2): set up with the test tools, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# eval: lm-evaluation-harness, so the zero-shot tests run on the local tasks.
scripts/setup.sh dev,eval
exec "${PATCHSPARSE_VENV:-.venv}/bin/python" -m pytest -q "$@"
