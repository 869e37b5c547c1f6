"""`patchsparse learn` under torchrun (2 CPU processes, gloo) learns the masks one process learns."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchsparse.cli.main import main
from patchsparse.io.maskfile import load_mask_spec

SRC = Path(__file__).resolve().parents[2] / "src"


def _text(path: Path) -> Path:
    words = "sparse dense tile mask weight group pattern layer model keeps learns two four of the a".split()
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(words) for _ in range(40)) + f" {i}." for i in range(60)]
    path.write_text("\n\n".join(paragraphs))
    return path


def _mask_files(directory: Path) -> tuple[dict, dict]:
    """Every tensor of the mask file, and its description less the last step's logged loss and
    timing (process 0 logs the mean of the processes' losses: equal up to float rounding) and the
    file's hash (safetensors writes its metadata keys in a per-process order)."""
    from safetensors.torch import load_file

    description = json.loads((directory / "masks.json").read_text())
    description["training"].pop("last_metrics")
    for entry in description["files"].values():
        entry.pop("sha256")
    return load_file(directory / "masks.safetensors"), description


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_learn_under_torchrun_matches_one_process(tiny_model_dir, tmp_path):
    data = _text(tmp_path / "train.txt")
    # global micro-batch 2 (one window per process), 2 micro-batches per step, a gathered checkpoint
    # after step 2 and at the end
    common = ["learn", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu", "--seqlen", "32",
              "--mode", "patch-joint", "--tile", "16", "16", "--steps", "3", "--batch", "2", "--grad-accum", "2",
              "--checkpoint-every", "2", "--calib-windows", "2", "--eval-windows", "0"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PATCHSPARSE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "patchsparse.cli.main", *common, "--out", str(tmp_path / "two")]  # sharded optimizer: the default
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("masks in") == 1  # process 0 alone reports and writes

    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert one["step"] == two["step"] == 3
    assert one["masks"].keys() == two["masks"].keys()
    for name, logits in one["masks"].items():
        for key, value in logits.items():
            # the same sums in another order: float rounding only, which Adam's normalisation can
            # magnify for a logit whose gradient is near zero (seen: 8e-5 on one of 6144 logits,
            # a tenth of one step at the 2:4 learning rate); the hard masks below must be identical
            torch.testing.assert_close(two["masks"][name][key], value, rtol=1e-4, atol=2e-4)
    # the sharded AdamW state was gathered into one checkpoint in the single-process format
    assert one["optimizer"]["state"].keys() == two["optimizer"]["state"].keys()
    for i, state in one["optimizer"]["state"].items():
        torch.testing.assert_close(two["optimizer"]["state"][i]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(two["optimizer"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"],
                                   rtol=1e-4, atol=1e-10)
    # the extracted masks are the same files
    tensors_one, description_one = _mask_files(tmp_path / "one" / "masks")
    tensors_two, description_two = _mask_files(tmp_path / "two" / "masks")
    assert description_two == description_one
    assert tensors_two.keys() == tensors_one.keys()
    assert all(torch.equal(tensors_two[k], tensors_one[k]) for k in tensors_one)
    a, b = load_mask_spec(tmp_path / "one" / "masks"), load_mask_spec(tmp_path / "two" / "masks")
    assert all(torch.equal(a.layers[n].keep_mask(), b.layers[n].keep_mask()) for n in a.layers)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 3  # one writer


def test_batch_must_split_over_processes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import patchsparse.learn.distributed as distributed
    from patchsparse.learn.distributed import DataParallel

    monkeypatch.setattr(distributed, "from_environment", lambda device_type="cpu": DataParallel(0, 2))
    code = main(["learn", "--model", str(tiny_model_dir), "--data", str(_text(tmp_path / "t.txt")), "--device", "cpu",
                 "--seqlen", "32", "--batch", "3", "--steps", "1", "--out", str(tmp_path / "o")])
    assert code == 2 and "multiple of 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
