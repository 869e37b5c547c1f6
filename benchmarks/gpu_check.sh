#!/usr/bin/env bash
# GPU check in one command (under 9 minutes on an H200): bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
# Writes OUTDIR/gpu_check.json and OUTDIR/summary.md; see benchmarks/gpu_check.py for the parts.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run] [--parts a,b]" >&2
    exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
