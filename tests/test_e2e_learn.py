"""Mask learning end to end on the embedded default model (short; still runs in CI)."""

import json

import pytest

from patchsparse.cli.main import main
from patchsparse.io.maskfile import load_mask_spec

pytestmark = pytest.mark.e2e


def test_learn_patch_joint_on_default_model(tmp_path):
    out, record = tmp_path / "run", tmp_path / "learn.json"
    args = ["learn", "--mode", "patch-joint", "--sparsity", "0.35", "--steps", "2", "--seqlen", "64",
            "--include", r"layers\.(0|1)\.", "--calib-windows", "1", "--eval-windows", "1", "--eval-seqlen", "64",
            "--checkpoint-every", "1", "--device", "cpu", "--out", str(out), "--json", str(record)]
    assert main(args) == 0
    spec = load_mask_spec(out / "masks")
    assert len(spec.layers) == 14                       # the 7 linears of blocks 0 and 1
    assert abs(spec.sparsity() - 0.35) < 0.01           # exact extraction
    # SmolLM2's k/v projections (192 x 576) have ragged 128 x 128 tiles: 2 x 5 grids
    assert spec.layers["model.layers.0.self_attn.k_proj"].dense_tiles.shape == (2, 5)
    figures = json.loads(record.read_text())["figures"]
    assert figures["steps_run"] == 2 and len((out / "metrics.jsonl").read_text().splitlines()) == 2
