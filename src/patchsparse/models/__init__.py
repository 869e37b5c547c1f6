"""Model resolution (built-in names, local directories, hub ids) and layer selection."""

from patchsparse.models.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from patchsparse.models.layers import LayerSelection, decoder_layers, select_linears

__all__ = [
    "LoadedModel",
    "LayerSelection",
    "decoder_layers",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "select_linears",
]
