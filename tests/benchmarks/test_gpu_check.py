"""The GPU check's dry run (CPU, tiny shapes) runs every part end to end, so the script cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_check(*args, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_dry_run_runs_every_part(tmp_path):
    proc = run_check(tmp_path / "out", "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    parts = result["parts"]
    assert list(parts) == ["correctness", "tests", "layers", "e2e", "learn"]
    assert all(p["status"] == "ok" for p in parts.values())
    correctness = parts["correctness"]["data"]
    assert correctness["complete"] and len(correctness["rows"]) == 3 * 4 * 4       # dtypes x sparsities x backends
    assert all(row["ok"] and row["max_error"] < 2e-2 for row in correctness["rows"])
    assert {row["backend"] for row in correctness["rows"]} == {"cpu", "split", "stripe", "triton"}
    assert all(set(row["paths"]) == {"1", "5", "33"} for row in correctness["rows"])
    assert len(parts["tests"]["data"]["collected"]) >= 1                          # the gpu tests still collect
    layers = parts["layers"]["data"]
    assert layers["complete"] and len(layers["cells"]) == 2 * 2                     # shapes x token counts
    assert all(len(c["speedup"]) == 4 * 4 and len(c["paths"]) == 4 * 4 for c in layers["cells"])
    e2e = parts["e2e"]["data"]
    # the packed formats themselves, then auto (which may keep slower layers dense); no Triton in CI
    assert e2e["complete"] and list(e2e["variants"]) == ["45% split", "45%", "35% split", "25% split"]
    assert e2e["variants"]["45% split"]["logits_error"] < 1e-4                     # hybrid == masked dense
    assert all(v["decode"]["1"]["speedup"] > 0 and v["kernel_paths"] for v in e2e["variants"].values())
    learn = parts["learn"]["data"]
    assert learn["complete"] and learn["patch_joint"]["time_ratio"] > 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "dry run" in summary and all(f"## {name}" in summary for name in parts)


def test_a_part_that_runs_out_of_time_keeps_what_it_wrote(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "e2e.json").write_text(json.dumps({"variants": {}, "complete": False}))   # as a part leaves it mid-way
    outcome = gpu_check.run_part("e2e", out, dry_run=True, timeout=0.5)
    assert outcome["status"].startswith("timeout after")
    assert outcome["data"] is not None and outcome["data"]["complete"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_and_without_dry_run_it_refuses(tmp_path):
    proc = run_check(tmp_path / "out", timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and not (tmp_path / "out").exists()
