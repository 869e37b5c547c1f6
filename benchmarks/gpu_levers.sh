#!/usr/bin/env bash
# The learning levers on a GPU, in one command: bash benchmarks/gpu_levers.sh OUTDIR [WORKDIR]
#
# Learns PATCH-Tile masks (edge-block start, the CPU preset's 40 steps, then 320 steps) and takes
# the strongest one-shot baseline (SparseGPT 2:4 on the middle blocks) at 35% and 45%, then runs
# `reconstruct_study.py` over them: which weight reconstruction helps which masks, in and out of
# domain. Parts run in order of importance and each appends to OUTDIR/study.jsonl as it ends, so a
# cut-short run still leaves what it finished. Needs the default model and text installed.
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_levers.sh OUTDIR [WORKDIR]" >&2
    exit 2
fi
out="$1"; work="${2:-$1/work}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
device="${DEVICE:-cuda}"
mkdir -p "$out" "$work"
ps() { "$python" -m patchsparse "$@" --device "$device"; }
study() { "$python" "$root/benchmarks/reconstruct_study.py" --device "$device" --threads 8 --out "$out/study.jsonl" "$@"; }
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

"$python" -c "import json, torch, platform; print(json.dumps({'torch': torch.__version__, 'python': platform.python_version(), \
'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))" | tee "$out/machine.json"
git -C "$root" rev-parse HEAD 2>/dev/null | tee "$out/commit.txt"

for s in 0.35 0.45; do
    stamp "learn patch-tile $s (edges, 40 steps)"
    ps learn --sparsity "$s" --init-allocation edges --no-eval --out "$work/tile-$s-40" --overwrite
    stamp "prune sparsegpt 2:4 middle blocks $s"
    ps prune --method sparsegpt --sparsity "$s" --allocation edges --out "$work/blocks-$s" --overwrite
done
stamp "study 35%"
study --masks "$work/tile-0.35-40/masks" --ways none fixed block:32:1e-3 block:32:3e-3 block:128:1e-3 fixed+block:32:1e-3
study --masks "$work/blocks-0.35" --ways none block:32:1e-3 saved+block:32:1e-3
stamp "learn patch-tile 0.35 (edges, 320 steps)"
ps learn --sparsity 0.35 --init-allocation edges --no-eval --steps 320 --out "$work/tile-0.35-320" --overwrite
study --masks "$work/tile-0.35-320/masks" --ways none block:32:1e-3
stamp "study 45%"
study --masks "$work/tile-0.45-40/masks" --ways none block:32:1e-3 block:128:1e-3
study --masks "$work/blocks-0.45" --ways none saved+block:32:1e-3
stamp "maskllm 2:4 and its baseline"
ps learn --mode maskllm --no-eval --out "$work/maskllm-40" --overwrite
ps prune --method sparsegpt --out "$work/sparsegpt-2of4" --overwrite
study --masks "$work/maskllm-40/masks" "$work/sparsegpt-2of4" --ways none block:32:1e-3
stamp done
