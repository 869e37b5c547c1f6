"""Nothing lost: `learn --overwrite` keeps the old run until the new one succeeds, a run directory
is locked against a second process, and killed writers' temporaries are cleaned up."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from patchsparse.cli.main import main
from patchsparse.errors import PatchsparseError
from patchsparse.io.lock import directory_lock, lock_path
from tests.cli.test_bad_inputs import tree_digest
from tests.conftest import write_random_paragraphs

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_random_paragraphs(tmp_path_factory.mktemp("safety-data") / "text.txt", 80, seed=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def learn(model, data, out, *extra):
    return ["learn", "--model", str(model), "--data", str(data), "--seqlen", "32", "--tile", "16", "16",
            "--steps", "2", "--calib-windows", "2", "--eval-windows", "0", "--checkpoint-every", "1",
            "--out", str(out), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety-run") / "run"
    assert main(learn(tiny_model_dir, text_file, out)) == 0
    return out


def test_overwrite_with_a_failing_new_run_keeps_the_old_one(finished_run, tiny_model_dir, text_file, tmp_path,
                                                           monkeypatch, capfd):
    import shutil

    import patchsparse.pipeline as pipeline

    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    before = tree_digest(tmp_path)
    # bad settings are refused before anything is touched
    assert main(learn("no/such/model/dir", text_file, out, "--overwrite")) == 2
    assert main(learn(tiny_model_dir, tmp_path / "missing.txt", out, "--overwrite")) == 2
    assert tree_digest(tmp_path) == before

    # a failure after the old run was set aside (here: the disk fills during training) restores it
    real = pipeline.learn_masks

    def fails_midway(model, windows, config, prior, out_dir, **kwargs):
        assert not any(p.name == "masks" for p in Path(out_dir).iterdir())  # a fresh directory
        real(model, windows, config, prior, out_dir, **kwargs)  # writes a whole new run …
        raise OSError(28, "No space left on device", str(Path(out_dir) / "masks"))  # … then fails

    monkeypatch.setattr(pipeline, "learn_masks", fails_midway)
    capfd.readouterr()
    assert main(learn(tiny_model_dir, text_file, out, "--overwrite", "--seed", "5")) == 2
    assert capfd.readouterr().err.strip().splitlines()[-1].startswith("patchsparse: error: No space left")
    assert tree_digest(tmp_path) == before  # the old run, byte for byte, and no leftovers beside it

    # and a successful overwrite replaces it, leaving nothing beside it
    monkeypatch.setattr(pipeline, "learn_masks", real)
    assert main(learn(tiny_model_dir, text_file, out, "--overwrite", "--seed", "5")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert '"seed": 5' in (out / "run.json").read_text()


def _hold_lock_in_another_process(directory: Path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import time
        from patchsparse.io.lock import directory_lock
        with directory_lock({str(directory)!r}):
            print("locked", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("command", ["learn", "prune", "run"])
def test_a_second_process_on_the_same_out_fails_at_once(command, tiny_model_dir, text_file, tmp_path, capfd):
    out = tmp_path / "run"
    argv = {"learn": learn(tiny_model_dir, text_file, out),
            "prune": ["prune", "--model", str(tiny_model_dir), "--data", str(text_file), "--seqlen", "32",
                      "--method", "magnitude", "--out", str(out), "--device", "cpu"],
            "run": ["run", "--model", str(tiny_model_dir), "--data", str(text_file), "--seqlen", "32",
                    "--out", str(out)]}[command]
    holder = _hold_lock_in_another_process(out)
    try:
        capfd.readouterr()
        started = time.perf_counter()
        assert main(argv) == 2
        assert time.perf_counter() - started < 5  # before loading anything
        [line] = capfd.readouterr().err.strip().splitlines()
        assert line.startswith("patchsparse: error: --out") and "in use by another patchsparse process" in line
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: the kernel releases its lock
        holder.wait(timeout=30)
    assert lock_path(out).exists()  # a stale file, but not a held lock
    if command == "run":  # the whole main job is long; taking the lock again is what matters here
        with directory_lock(out):
            pass
        return
    assert main(argv) == 0
    assert not lock_path(out).exists()  # removed on release


def test_lock_is_exclusive_and_released(tmp_path):
    with directory_lock(tmp_path / "run"):
        with pytest.raises(PatchsparseError, match="in use"):
            with directory_lock(tmp_path / "run"):
                pass
    with directory_lock(tmp_path / "run"):  # released: taken again
        pass
    assert list(tmp_path.iterdir()) == []


def test_tile_reaching_the_target_is_hand_computed():
    from patchsparse.masks.tiles import check_tile_reaches_target, reachable_hybrid_sparsity

    # 64x64 in 16x16 tiles: 16 tiles; target 35% -> dense fraction 0.3 -> 4.8 tiles -> 5 dense
    # kept = 5*256 + 0.5*(4096 - 5*256) = 2688 -> sparsity 1 - 2688/4096 = 0.34375
    assert reachable_hybrid_sparsity([(64, 64)], (16, 16), 0.35) == pytest.approx(1 - 2688 / 4096)
    # one tile per layer: all 2:4 (0.3 of a tile rounds to none) -> 50%
    assert reachable_hybrid_sparsity([(64, 64)], (512, 512), 0.35) == pytest.approx(0.5)
    check_tile_reaches_target([(64, 64)], (16, 16), 0.35)
    with pytest.raises(PatchsparseError, match="too coarse"):
        check_tile_reaches_target([(64, 64)], (512, 512), 0.35)
    # ragged: 40x40 in 32x32 tiles -> tiles of 1024, 256, 256 and 64 weights (row-major); 0.3 * 1600 = 480
    # weights dense; cumulative sums 0, 1024, 1280, … -> none is closest (|0 - 480| < |1024 - 480|) -> all 2:4
    assert reachable_hybrid_sparsity([(40, 40)], (32, 32), 0.35) == pytest.approx(0.5)
