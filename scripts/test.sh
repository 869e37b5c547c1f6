#!/usr/bin/env bash
# README command (2): set up with the test tools, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec "${PATCHSPARSE_VENV:-.venv}/bin/python" -m pytest -q "$@"
