"""`patchsparse bench`: runs on small shapes, writes its record, rejects bad input in one line."""

import json

import pytest

from patchsparse.cli.main import main


def test_bench_small_shapes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--shapes", "64x64,48x96", "--tokens", "1,3", "--tile", "16x16", "--rounds", "1",
                 "--threads", "1", "--device", "cpu", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "ideal speedups" in text and "45%" in text and "2:4" in text
    cells = json.loads(out.read_text())["figures"]["cells"]
    assert [(c["shape"], c["tokens"]) for c in cells] == [([64, 64], 1), ([64, 64], 3), ([48, 96], 1), ([48, 96], 3)]
    assert all(set(c["speedup"]) == {"25%", "35%", "45%", "2:4"} and all(v > 0 for v in c["speedup"].values())
               for c in cells)


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "64by64"], "--shapes"),
    (["--shapes", "64x66"], "multiple of 4"),
    (["--sparsities", "0.7"], "--sparsities"),
    (["--tokens", "one"], "--tokens"),
])
def test_bench_bad_input(argv, message, capsys):
    assert main(["bench", "--device", "cpu"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("patchsparse: error:") and message in err and len(err.splitlines()) == 1
