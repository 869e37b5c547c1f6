"""Broken and hostile inputs through the real CLI entry point, one table row each.

Every row must end with exit code 2, exactly one line on stderr that names the problem, no
traceback, and nothing written, removed or changed under the case's folder (hashed before and
after). Fault rows that need a small tmpfs (full or read-only disk) run only as root.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from patchsparse.cli.main import main
from tests.conftest import write_random_paragraphs

CPU = ["--device", "cpu"]


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under `root` with its kind and, for files, the sha256 of its bytes."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            digest[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            digest[rel] = "dir"
        else:
            digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


@dataclass
class Workspace:
    root: Path
    model_dir: Path     # the tiny model, pristine (do not edit: copy with `model_copy`)
    text: Path
    masks: Path         # a mask directory made by `prune` for the tiny model
    run: Path           # a finished `learn` run of the tiny model
    monkeypatch: pytest.MonkeyPatch

    def model_copy(self) -> Path:
        return Path(shutil.copytree(self.model_dir, self.root / "model"))

    def masks_copy(self) -> Path:
        return Path(shutil.copytree(self.masks, self.root / "masks"))

    def run_copy(self) -> Path:
        return Path(shutil.copytree(self.run, self.root / "run"))

    def file(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def tmpfs(self, name: str, size: str, read_only: bool = False) -> Path:
        """A small tmpfs under the case folder (root only); unmounted at the end of the test."""
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root to mount a tmpfs")
        path = self.root.parent / f"{self.root.name}-{name}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode:
            pytest.skip("cannot mount a tmpfs here")
        self.monkeypatch.setattr(self, "_mounts", [*getattr(self, "_mounts", []), path], raising=False)
        return path


def prune_args(ws: Workspace, model: Path | str | None = None, data: Path | str | None = None,
               out: Path | None = None, *extra: str) -> list[str]:
    return ["prune", "--model", str(model or ws.model_dir), "--data", str(data or ws.text), "--seqlen", "32",
            "--method", "magnitude", "--out", str(out or ws.root / "out"), *CPU, *extra]


def learn_args(ws: Workspace, out: Path, *extra: str) -> list[str]:
    return ["learn", "--model", str(ws.model_dir), "--data", str(ws.text), "--seqlen", "32", "--tile", "16", "16",
            "--steps", "2", "--calib-windows", "2", "--eval-windows", "0", "--checkpoint-every", "1",
            "--out", str(out), *CPU, *extra]


def apply_args(ws: Workspace, masks: Path) -> list[str]:
    return ["apply", "--model", str(ws.model_dir), "--masks", str(masks), *CPU]


# --------------------------------------------------------------------------- the cases

def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _model_with(edit: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        model = ws.model_copy()
        edit(model)
        return prune_args(ws, model=model)
    return setup


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _config(**changes) -> Callable[[Path], None]:
    return lambda model: _edit_json(model / "config.json", lambda d: d.update(changes))


def _data(name: str, data: bytes) -> Callable[[Workspace], list[str]]:
    return lambda ws: prune_args(ws, data=ws.file(name, data))


def _parquet_without_reader(ws: Workspace) -> list[str]:
    import sys

    ws.monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow…` now fails as if not installed
    ws.monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    return prune_args(ws, data=ws.file("data.parquet", b"PAR1 not really"))


def _gz(text: bytes) -> bytes:
    return gzip.compress(text)


def _masks_with(edit: Callable[[dict], None]) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        masks = ws.masks_copy()
        _edit_json(masks / "masks.json", edit)
        return apply_args(ws, masks)
    return setup


def _first_layer(document: dict) -> dict:
    return next(iter(document["layers"].values()))


def _nan_weights(ws: Workspace) -> list[str]:
    from safetensors.torch import load_file, save

    masks = Path(shutil.copytree(ws.run / "masks", ws.root / "masks"))  # learn stores a weight sample
    tensors = load_file(masks / "masks.safetensors")
    key = next(k for k in tensors if k.startswith("weights_sample/"))
    tensors[key][3] = float("nan")
    payload = save(tensors)
    (masks / "masks.safetensors").write_bytes(payload)
    _edit_json(masks / "masks.json", lambda d: d["files"]["masks.safetensors"].update(
        sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload)))
    return apply_args(ws, masks)


def _resume_with(damage: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        run = ws.run_copy()
        damage(run)
        return learn_args(ws, run, "--resume")
    return setup


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _malicious(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        torch.save({"format": 2, "x": _RunsCode(str(run.parent / "code-ran"))}, run / name)
    return damage


def _report_with(edit: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    def setup(ws: Workspace) -> list[str]:
        run = ws.run_copy()
        edit(run)
        return ["report", str(run)]
    return setup


def _full_disk(ws: Workspace) -> list[str]:
    disk = ws.tmpfs("full", "64k")
    (disk / "filler").write_bytes(b"\0" * (60 * 1024))  # leaves less than the mask file needs
    return prune_args(ws, out=disk / "out")


def _read_only_disk(ws: Workspace) -> list[str]:
    return prune_args(ws, out=ws.tmpfs("ro", "64k", read_only=True) / "out")


def _learn_on_full_disk(ws: Workspace) -> list[str]:
    disk = ws.tmpfs("full", "64k")
    (disk / "filler").write_bytes(b"\0" * (52 * 1024))  # the run's first files fit, its checkpoint not
    return learn_args(ws, disk / "run")


def _unwritable_cache(ws: Workspace) -> list[str]:
    ws.monkeypatch.setenv("PATCHSPARSE_CACHE", str(ws.file("cache-is-a-file", b"x") / "cache"))
    return ["info", "--model", "smollm2-135m"]


def _hub_behind_dead_proxy(ws: Workspace) -> list[str]:
    ws.monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    ws.monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the discard port: nothing listens
    return prune_args(ws, model="someone/some-model")


def _out_below_file(ws: Workspace) -> list[str]:
    return prune_args(ws, out=ws.file("a-file", b"x") / "out")


def _learn_json_dir(ws: Workspace) -> list[str]:
    (ws.root / "record").mkdir()
    return learn_args(ws, ws.root / "new-run", "--json", str(ws.root / "record"))


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    setup: Callable[[Workspace], list[str]]
    message: str  # a regex the one stderr line must match
    # a new run directory that may stay behind, for `learn --resume` once the fault is fixed
    resumable: str | None = None


CASES = [
    # corrupt or inconsistent model directories
    Case("model", "truncated weights", _model_with(lambda m: _truncate(m / "model.safetensors")), "model"),
    Case("model", "random weights file", _model_with(
        lambda m: (m / "model.safetensors").write_bytes(os.urandom(4096))), "model"),
    Case("model", "empty weights file", _model_with(lambda m: (m / "model.safetensors").write_bytes(b"")), "model"),
    Case("model", "no weights file", _model_with(lambda m: (m / "model.safetensors").unlink()), "model"),
    Case("model", "config hidden size", _model_with(_config(hidden_size=96)), "model"),
    Case("model", "config layer count", _model_with(_config(num_hidden_layers=3)), "model"),
    Case("model", "config vocab size", _model_with(_config(vocab_size=100)), "model"),
    Case("model", "config not JSON", _model_with(lambda m: (m / "config.json").write_text("{oops")), "model|config"),
    Case("model", "config a list", _model_with(lambda m: (m / "config.json").write_text("[1, 2]")), "model|config"),
    Case("model", "no config", _model_with(lambda m: (m / "config.json").unlink()), "model|config"),
    Case("model", "config unknown architecture", _model_with(_config(model_type="no-such-model")), "model"),
    Case("model", "tokenizer corrupt", _model_with(
        lambda m: (m / "tokenizer.json").write_text("{not json")), "model|tokenizer"),
    # data files
    Case("data", "txt not UTF-8", _data("latin.txt", "Café crème, très jolie.\n\n".encode("latin-1") * 50),
         "UTF-8"),
    Case("data", "txt binary", _data("binary.txt", os.urandom(2048)), "UTF-8"),
    Case("data", "jsonl not UTF-8", _data("bad.jsonl", b'{"text": "caf\xe9"}\n'), "UTF-8"),
    Case("data", "json.gz not gzip", _data("plain.json.gz", b'{"text": "not compressed"}\n'), "gzip"),
    Case("data", "json.gz truncated", _data("cut.json.gz", _gz(
        b"".join(b'{"text": "%s"}\n' % os.urandom(30).hex().encode() for _ in range(200)))[:2000]),
         "gzip|truncated"),
    Case("data", "json.gz not UTF-8", _data("latin.json.gz", _gz('{"text": "Café"}\n'.encode("latin-1"))),
         "UTF-8"),
    Case("data", "json.gz of non-objects", _data("list.json.gz", _gz(b"[1, 2, 3]\n")), "text"),
    Case("data", "parquet garbage", _data("bad.parquet", os.urandom(1024)), "parquet"),
    Case("data", "parquet without its reader", _parquet_without_reader, "pyarrow"),
    Case("data", "empty txt", _data("empty.txt", b"\n\n  \n"), "no text"),
    # unwritable outputs
    Case("output", "--json is a directory", lambda ws: prune_args(ws) + ["--json", str(ws.root)], "directory"),
    Case("output", "--json below a file", lambda ws: prune_args(ws) + [
        "--json", str(ws.file("a-file", b"x") / "r.json")], "is a file"),
    Case("output", "--out below a file", _out_below_file, "is a file"),
    Case("output", "--out is a file", lambda ws: prune_args(ws, out=ws.file("a-file", b"x"), ) + ["--overwrite"],
         "not a directory"),
    Case("output", "learn --json is a directory", _learn_json_dir, "directory"),
    Case("output", "learn --out below a file", lambda ws: learn_args(ws, ws.file("a-file", b"x") / "run"),
         "is a file"),
    Case("output", "apply --json is a directory", lambda ws: apply_args(ws, ws.masks) + ["--json", str(ws.root)],
         "directory"),
    Case("output", "export --out below a file", lambda ws: ["export", "--model", str(ws.model_dir), "--masks",
                                                           str(ws.masks), "--out", str(ws.file("f", b"x") / "o")],
         "is a file"),
    Case("output", "cache below a file", _unwritable_cache, "cache|Not a directory|File exists"),
    Case("output", "full disk", _full_disk, "No space left"),
    Case("output", "read-only disk", _read_only_disk, "not writable|Read-only"),
    Case("output", "learn on a full disk", _learn_on_full_disk, "No space left", resumable="case-full/run"),
    # wrongly typed fields of masks.json
    Case("masks", "files null", _masks_with(lambda d: d.update(files=None)), "'files'"),
    Case("masks", "files a list", _masks_with(lambda d: d.update(files=["masks.safetensors"])), "'files'"),
    Case("masks", "file entry a string", _masks_with(lambda d: d["files"].update({"masks.safetensors": "x"})),
         "sha256"),
    Case("masks", "metadata a string", _masks_with(lambda d: d.update(metadata="x")), "'metadata'"),
    Case("masks", "metadata a list", _masks_with(lambda d: d.update(metadata=[1])), "'metadata'"),
    Case("masks", "layers null", _masks_with(lambda d: d.update(layers=None)), "'layers'"),
    Case("masks", "layer entry a number", _masks_with(lambda d: d["layers"].update({next(iter(d["layers"])): 3})),
         "invalid entry"),
    Case("masks", "pattern 2:0", _masks_with(lambda d: _first_layer(d).update(pattern="2:0")), "N:M"),
    Case("masks", "pattern 4:2", _masks_with(lambda d: _first_layer(d).update(pattern="4:2")), "N:M"),
    Case("masks", "pattern a number", _masks_with(lambda d: _first_layer(d).update(pattern=24)), "pattern"),
    Case("masks", "negative shape", _masks_with(lambda d: _first_layer(d).update(shape=[-64, 64])), "positive"),
    Case("masks", "shape of strings", _masks_with(lambda d: _first_layer(d).update(shape=["a", "b"])), "positive"),
    Case("masks", "shape of three", _masks_with(lambda d: _first_layer(d).update(shape=[64, 64, 1])), "positive"),
    Case("masks", "no base model", _masks_with(lambda d: d.pop("base_model")), "base_model"),
    Case("masks", "fingerprint null", _masks_with(lambda d: d["base_model"].update(fingerprint=None)),
         "fingerprint"),
    Case("masks", "fingerprint removed", _masks_with(lambda d: d["base_model"].pop("fingerprint")), "fingerprint"),
    Case("masks", "fingerprint a number", _masks_with(lambda d: d["base_model"].update(fingerprint=7)),
         "fingerprint"),
    Case("masks", "NaN in the weight sample", _nan_weights, "NaN"),
    Case("masks", "target sparsity a string", _masks_with(lambda d: d["metadata"].update(target_sparsity="35%")),
         "target sparsity"),
    # damaged run files on resume
    Case("resume", "truncated checkpoint", _resume_with(lambda r: _truncate(r / "checkpoint.pt")), "corrupt"),
    Case("resume", "truncated prior", _resume_with(lambda r: _truncate(r / "prior.pt")), "corrupt"),
    Case("resume", "empty checkpoint", _resume_with(lambda r: (r / "checkpoint.pt").write_bytes(b"")), "corrupt"),
    Case("resume", "random checkpoint", _resume_with(
        lambda r: (r / "checkpoint.pt").write_bytes(os.urandom(4096))), "corrupt"),
    Case("resume", "checkpoint of a list", _resume_with(lambda r: torch.save([1, 2], r / "checkpoint.pt")),
         "checkpoint"),
    Case("resume", "checkpoint without masks", _resume_with(lambda r: torch.save(
        {k: v for k, v in torch.load(r / "checkpoint.pt").items() if k != "masks"}, r / "checkpoint.pt")),
         "not a valid checkpoint"),
    Case("resume", "prior of strings", _resume_with(lambda r: torch.save({"a": "b"}, r / "prior.pt")),
         "not a valid prior"),
    Case("resume", "malicious checkpoint", _resume_with(_malicious("checkpoint.pt")), "refused to load"),
    Case("resume", "malicious prior", _resume_with(_malicious("prior.pt")), "refused to load"),
    # report on a run directory with unexpected entries
    Case("report", "report.md a folder", _report_with(
        lambda r: ((r / "report.md").unlink(), (r / "report.md").mkdir())), "not a file"),
    Case("report", "figures a file", _report_with(
        lambda r: (shutil.rmtree(r / "figures"), (r / "figures").write_text("x"))), "not a folder"),
    Case("report", "masks a file", _report_with(
        lambda r: (shutil.rmtree(r / "masks"), (r / "masks").write_text("x"))), "mask"),
    Case("report", "masks.json a folder", _report_with(
        lambda r: ((r / "masks" / "masks.json").unlink(), (r / "masks" / "masks.json").mkdir())), "mask"),
    Case("report", "masks.json not JSON", _report_with(
        lambda r: (r / "masks" / "masks.json").write_text("{")), "not valid JSON"),
    Case("report", "no such directory", lambda ws: ["report", str(ws.root / "missing")], "does not exist"),
    Case("report", "directory is a file", lambda ws: ["report", str(ws.file("a-file", b"x"))], "not a directory"),
    # a tile larger than the matrix
    Case("tile", "tile larger than every layer", lambda ws: prune_args(ws) + ["--tile", "512", "512",
                                                                              "--sparsity", "0.35"], "too coarse"),
    Case("tile", "tile as large as the smallest layer", lambda ws: prune_args(ws) + ["--tile", "64", "64",
                                                                                     "--sparsity", "0.35"],
         "too coarse"),
    # `learn --overwrite` of a finished run with a bad input: the old run stays as it was
    Case("overwrite", "model typo", lambda ws: learn_args(ws, ws.run_copy(), "--overwrite")[:2] + [
        str(ws.root / "no-such-model")] + learn_args(ws, ws.root / "run", "--overwrite")[3:], "model"),
    Case("overwrite", "data not UTF-8", lambda ws: [
        a if a != str(ws.text) else str(ws.file("x.txt", b"\xff\xfe" * 99)) for a in
        learn_args(ws, ws.run_copy(), "--overwrite")], "UTF-8"),
    Case("overwrite", "--json below a file", lambda ws: learn_args(
        ws, ws.run_copy(), "--overwrite", "--json", str(ws.file("f", b"x") / "r.json")), "is a file"),
    Case("overwrite", "seqlen beyond the context", lambda ws: learn_args(
        ws, ws.run_copy(), "--overwrite")[:6] + ["4096"] + learn_args(ws, ws.root / "run")[7:] + ["--overwrite"],
        "context"),
    # a hub id behind an unreachable proxy
    Case("hub", "dead proxy", _hub_behind_dead_proxy, "unreachable"),
]


# --------------------------------------------------------------------------- fixtures and the test

@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_random_paragraphs(tmp_path_factory.mktemp("bad-inputs-data") / "text.txt", 80, seed=0)


@pytest.fixture(scope="module")
def made(tiny_model_dir, text_file, tmp_path_factory):
    """A mask directory from `prune` and a finished run from `learn`, made once."""
    root = tmp_path_factory.mktemp("bad-inputs-made")
    torch.set_num_threads(1)
    masks, run = root / "masks", root / "run"
    assert main(["prune", "--model", str(tiny_model_dir), "--data", str(text_file), "--seqlen", "32",
                 "--method", "magnitude", "--out", str(masks), *CPU]) == 0
    assert main(["learn", "--model", str(tiny_model_dir), "--data", str(text_file), "--seqlen", "32",
                 "--tile", "16", "16", "--steps", "2", "--calib-windows", "2", "--eval-windows", "0",
                 "--checkpoint-every", "1", "--out", str(run), *CPU]) == 0
    assert main(["report", str(run)]) == 0
    return masks, run


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}: {c.name}" for c in CASES])
def test_bad_input_is_one_clean_line(case, made, tiny_model_dir, text_file, tmp_path, monkeypatch, capfd):
    root = tmp_path / "case"
    root.mkdir()
    ws = Workspace(root, tiny_model_dir, text_file, *made, monkeypatch)
    try:
        argv = case.setup(ws)
        before = tree_digest(tmp_path)
        capfd.readouterr()
        started = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - started
        out, err = capfd.readouterr()
        after = tree_digest(tmp_path)
    finally:
        for mount in getattr(ws, "_mounts", []):
            subprocess.run(["umount", str(mount)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    if case.resumable:  # the run had started: its progress notes come before the one error line
        lines = lines[-1:]
        assert sum("error" in line for line in err.splitlines()) == 1, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("patchsparse: error: ")
    assert re.search(case.message, lines[0]), lines[0]
    if case.resumable:  # only the new run itself, and no temporary files anywhere
        assert all(k.startswith(case.resumable + "/") or k == case.resumable for k in after if k not in before)
        assert not any(k.endswith((".tmp", ".partial")) for k in after)
        after = {k: v for k, v in after.items() if k in before}
    assert before == after, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    assert not (tmp_path / "code-ran").exists() and not (root / "code-ran").exists()
    if case.category == "hub":
        assert seconds < 15, seconds


def test_the_table_covers_every_category():
    counts: dict[str, int] = {}
    for case in CASES:
        counts[case.category] = counts.get(case.category, 0) + 1
    assert set(counts) == {"model", "data", "output", "masks", "resume", "report", "tile", "overwrite", "hub"}
    assert all(n >= 1 for n in counts.values())
