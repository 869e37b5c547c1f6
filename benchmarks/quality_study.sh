#!/usr/bin/env bash
# What moves PATCH's gap-closed figures at a short CPU budget (docs/LEARN.md, "Short budgets").
# Each step is a benchmarks/quality.py run with one setting changed, in its own results directory
# (resumable like the main run); run it after the main `python benchmarks/quality.py`, whose
# trained runs in runs/quality the threshold step re-extracts without retraining.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
learned="patch-tile-25%,patch-tile-35%,patch-tile-45%,patch-joint-25%,patch-joint-35%,patch-joint-45%"

# 1. the published threshold extraction instead of exact, on the main run's trained logits
"$PY" benchmarks/quality.py --out runs/quality --extraction threshold --only "dense,maskllm-2:4,$learned" \
    --results runs/quality/RESULTS-threshold.md
# 2. MaskLLM with its 2:4 logits at a third of the preset's learning rate (1e-3, as PATCH-Joint's in 3.)
"$PY" benchmarks/quality.py --out runs/study-maskllm-lr --nm-lr-scale 0.333 --only maskllm-2:4 \
    --results runs/study-maskllm-lr/RESULTS.md
# 3. PATCH-Joint with its 2:4 logits at a third of the preset's learning rate (0.1 instead of 0.3 of lr)
"$PY" benchmarks/quality.py --out runs/study-nm-lr --nm-lr-scale 0.1 --only patch-joint-25%,patch-joint-35%,patch-joint-45% \
    --results runs/study-nm-lr/RESULTS.md
# 4. three times the training budget for MaskLLM and PATCH-Tile 35%
"$PY" benchmarks/quality.py --out runs/study-steps120 --steps 120 --only dense,maskllm-2:4,patch-tile-35% \
    --results runs/study-steps120/RESULTS.md
