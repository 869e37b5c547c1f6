"""Export a masked model as a standard Hugging Face checkpoint, with the mask files as a sidecar.

The checkpoint is what `save_pretrained` writes (the pruned weights are zeros), so plain
`transformers.AutoModelForCausalLM.from_pretrained` loads it without patchsparse. The masks travel
along in `patchsparse_masks/`, since a zero weight alone does not say it was pruned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from patchsparse.atomic import atomic_directory, usual_file_modes
from patchsparse.errors import PatchsparseError
from patchsparse.io.maskfile import MASKS_JSON, MASKS_TENSORS, WEIGHTS_TENSORS, apply_mask_dir, read_mask_document
from patchsparse.masks import HybridMaskSpec
from patchsparse.models import LoadedModel
from patchsparse.models.experts import fused_experts
from patchsparse.version import __version__

SIDECAR = "patchsparse_masks"
EXPORT_JSON = "export.json"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output before any expensive work."""
    if out.exists() and not overwrite:
        raise PatchsparseError(f"output directory {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise PatchsparseError(f"output path {out} exists and is not a directory")


def export_checkpoint(loaded: LoadedModel, mask_dir: str | Path, out: str | Path,
                      overwrite: bool = False) -> HybridMaskSpec:
    """Apply the masks in `mask_dir` to `loaded.model` (in place) and write a checkpoint to `out`.

    The whole directory appears in one rename: an interrupted export leaves nothing at `out`.
    """
    mask_dir, out = Path(mask_dir), Path(out)
    check_output_dir(out, overwrite)
    if out.resolve() == mask_dir.resolve():
        raise PatchsparseError("the export directory must differ from the mask directory")
    document = read_mask_document(mask_dir)
    spec = apply_mask_dir(loaded.model, mask_dir)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            with fused_experts(loaded.model):  # transformers' own layout, so plain transformers reloads it
                loaded.model.save_pretrained(tmp)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
            sidecar = tmp / SIDECAR
            sidecar.mkdir()
            for name in (MASKS_JSON, MASKS_TENSORS, WEIGHTS_TENSORS):
                if (mask_dir / name).is_file():
                    shutil.copyfile(mask_dir / name, sidecar / name)
            info = {
                "package_version": __version__,
                "base_model": loaded.identity,
                "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                "achieved_sparsity": spec.sparsity(),
                "mask_fingerprint": document.get("files", {}).get(MASKS_TENSORS, {}).get("sha256"),
            }
            (sidecar / EXPORT_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n")
            usual_file_modes(tmp)  # the safetensors writer leaves weights private (0600)
    except FileExistsError:
        raise PatchsparseError(f"output directory {out} exists; pass --overwrite to replace it") from None
    return spec
