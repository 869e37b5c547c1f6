#!/usr/bin/env bash
# The block-reconstruction rows of the quality benchmark, most important first, on the CPU:
#   bash benchmarks/levers_study.sh [OUTDIR]      (default runs/levers; resumable, about 3 h on 2 cores)
# Each group pairs the learned masks with the strongest one-shot baseline at the same sparsity,
# both with and without the same block reconstruction; the last groups try learning the 2:4 masks
# together with the weights and learning the tiles against fitted 2:4 weights, and give the one-shot
# rows the learned rows' time. Writes OUTDIR/RESULTS.md (not docs/RESULTS.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/quality_env.sh"
out="${1:-runs/levers}"
for rows in dense,patch-tile-35%-edges-block,blocks-edges-35%,blocks-edges-35%-block \
            patch-tile-45%-edges-block,blocks-edges-45%,blocks-edges-45%-block \
            sparsegpt-2:4,sparsegpt-2:4-block,maskllm-2:4-block \
            patch-tile-25%-edges-block,blocks-edges-25%,blocks-edges-25%-block \
            maskllm-2:4-joint-block,blocks-edges-35%-block128,maskllm-middle-35%-joint-block \
            blocks-edges-45%-block128,patch-tile-35%-edges-fitted-block,patch-tile-45%-edges-fitted-block; do
    "$python" benchmarks/quality.py --out "$out" --results "$out/RESULTS.md" --only "$rows"
done
