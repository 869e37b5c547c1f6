"""Hard masks from learned logits: `extract_masks` -> `HybridMaskSpec`."""

from patchsparse.extract.masks import POLICIES, ExtractionReport, exact_tiles, extract_masks, extraction_report

__all__ = ["POLICIES", "ExtractionReport", "exact_tiles", "extract_masks", "extraction_report"]
