#!/usr/bin/env bash
# The run behind docs/RESULTS.md: the rows that answer "does learning pay?" at 35/45/25% and 2:4, each
# learned pipeline beside the strongest one-shot baseline at the same sparsity, with and without the same
# block reconstruction; most important first, so that a stopped run still answers for 35%:
#   bash benchmarks/results_run.sh [OUTDIR]      (default runs/results; resumable, about 2 h on 2 cores)
# The wider studies live in benchmarks/quality_study.sh and benchmarks/levers_study.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/quality_env.sh"
out="${1:-runs/results}"
for rows in dense,sparsegpt-2:4,blocks-edges-35%,patch-tile-35%,patch-tile-35%-edges-block,blocks-edges-35%-block,blocks-edges-35%-block128,patch-tile-35%-edges-block128 \
            patch-tile-45%,blocks-edges-45%,patch-tile-45%-edges-block,blocks-edges-45%-block,blocks-edges-45%-block128 \
            magnitude-2:4,wanda-2:4,maskllm-2:4,maskllm-2:4-block,sparsegpt-2:4-block \
            patch-tile-25%,blocks-edges-25%,patch-tile-25%-edges-block,blocks-edges-25%-block \
            sparsegpt-unstructured-25%,sparsegpt-unstructured-35%,sparsegpt-unstructured-45% \
            maskllm-2:4-joint-block; do
    "$python" benchmarks/quality.py --out "$out" --set results --only "$rows"
done
