#!/usr/bin/env bash
# README command (1): set up, then run the main job on the embedded default model and corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${PATCHSPARSE_VENV:-.venv}/bin/patchsparse" run "$@"
