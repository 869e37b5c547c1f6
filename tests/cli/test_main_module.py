"""`python -m patchsparse` is the `patchsparse` command, also when torchrun launches it."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from patchsparse.cli.main import main
from patchsparse.io.maskfile import load_mask_spec

SRC = Path(__file__).resolve().parents[2] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "PATCHSPARSE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "patchsparse", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_python_m_runs_the_command(tiny_model_dir, capsys):
    run = _module("info", "--model", str(tiny_model_dir), "--device", "cpu")
    assert run.returncode == 0, run.stderr[-2000:]
    assert main(["info", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    assert run.stdout == capsys.readouterr().out and "model.layers.1.mlp.down_proj" in run.stdout


def test_python_m_bad_input_and_no_command():
    run = _module("eval", "--model", "./missing-dir/model", "--device", "cpu")
    assert run.returncode == 2
    assert run.stderr.strip().startswith("patchsparse: error:") and len(run.stderr.strip().splitlines()) == 1
    bare = _module()
    assert bare.returncode == 2 and bare.stderr.startswith("usage: patchsparse")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchrun_launches_the_module(tiny_model_dir, tmp_path):
    words = "sparse dense tile mask weight group pattern layer model keeps learns two four of the a".split()
    rng = random.Random(0)
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) + f" {i}." for i in range(30)))
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "patchsparse", "learn", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu",
           "--seqlen", "32", "--mode", "patch-joint", "--tile", "16", "16", "--steps", "1", "--batch", "2",
           "--grad-accum", "1", "--calib-windows", "2", "--eval-windows", "0", "--out", str(out)]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # both processes ran the command, as one group: each computed its prior, process 0 alone wrote
    assert (run.stdout + run.stderr).count("prior computed") == 2
    assert run.stdout.count("masks in") == 1
    spec = load_mask_spec(out / "masks")
    assert spec.layers and abs(spec.sparsity() - 0.35) < 0.02
