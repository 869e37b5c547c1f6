# Sourced by the quality scripts that run benchmarks/quality.py group by group: moves to the
# repository root (relative paths, so that the command recorded in the results names no machine's
# folders) and sets $python (PYTHON, else the project's .venv, else python3) with src on PYTHONPATH.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
