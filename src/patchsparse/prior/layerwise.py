"""Layer-by-layer calibration (as SparseGPT and Wanda do), so memory scales with one layer.

1. Run the model on the calibration windows until the first decoder layer, keep what it
   receives (hidden states) and stop the forward with a private exception. Each decoder layer's
   own keyword arguments (attention mask, position embeddings (cos, sin), position ids) are
   recorded as the model's forward passes them: the first batch of each batch size runs through
   every layer once. Models that interleave sliding-window and full attention (Gemma-2/3,
   Cohere2, GPT-OSS) hand each layer the mask and positions of its own type; layers of one type
   share the same tensors, so recording them per layer costs nothing.
2. For each decoder layer in turn: accumulate a statistic per selected linear with forward
   pre-hooks, let the caller prune the layer, recompute the layer's outputs with the pruned
   weights and write them over its inputs: they are the next layer's inputs.

Only one (N, T, hidden) activation buffer is alive at a time, plus one layer's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn as nn

from patchsparse.errors import PatchsparseError
from patchsparse.models.layers import LayerSelection, decoder_layers, select_linears
from patchsparse.utils import progress


class Statistic(Protocol):
    def accumulate(self, x: torch.Tensor) -> None: ...


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer has its inputs."""


@dataclass
class LayerInputs:
    """The calibration inputs of the current decoder layer, overwritten in place as layers advance."""

    hidden: torch.Tensor                      # (N, T, hidden)
    batch_size: int
    # layer index -> batch size -> positional args after hidden / keyword args, as the model passed them
    extra_args: dict[int, dict[int, tuple]] = field(default_factory=dict)
    kwargs: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)

    def batches(self) -> Iterator[slice]:
        for start in range(0, self.hidden.shape[0], self.batch_size):
            yield slice(start, min(start + self.batch_size, self.hidden.shape[0]))

    def output(self, layer: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder layer `index` on a batch `x` of its inputs (rows of `hidden` or a tensor like them),
        with gradients if enabled. -> (rows, T, hidden)"""
        size = x.shape[0]
        out = layer(x, *self.extra_args[index][size], **self.kwargs[index][size])
        return out[0] if isinstance(out, (tuple, list)) else out  # older layers return (hidden_states, ...)

    @torch.no_grad()
    def outputs(self, layer: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder layer `index` on all of `x` (N, T, hidden), batch by batch. -> (N, T, hidden)"""
        return torch.cat([self.output(layer, index, x[rows]) for rows in self.batches()])

    @torch.no_grad()
    def run(self, layer: nn.Module, index: int, write_outputs: bool) -> None:
        """Call decoder layer `index` on every batch; with `write_outputs`, its outputs replace its inputs."""
        for rows in self.batches():
            out = self.output(layer, index, self.hidden[rows])
            if write_outputs:
                self.hidden[rows] = out


def relative_block_error(output: torch.Tensor, target: torch.Tensor, block_input: torch.Tensor) -> torch.Tensor:
    """‖output − target‖² / ‖target − input‖²: a block's output error relative to what the block adds
    to the residual stream, so that it reads the same whatever the stream's scale. -> scalar"""
    return (output.float() - target.float()).pow(2).sum() / (target.float() - block_input.float()).pow(2).sum().clamp_min(1e-12)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, layers: nn.ModuleList,
                         batch_size: int = 1) -> LayerInputs:
    """What each decoder layer receives besides its hidden states, and the first layer's hidden
    states, for each calibration window. windows (N, T) -> LayerInputs"""
    device = next(model.parameters()).device
    n, last = windows.shape[0], len(layers) - 1
    state: dict[str, Any] = {"filled": 0, "extra": {}, "kwargs": {}, "sizes": set()}

    def make_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            size = hidden.shape[0]
            # Without padding these depend on the batch shape only, so one copy per batch size suffices.
            state["extra"].setdefault(index, {}).setdefault(size, tuple(args[1:]))
            state["kwargs"].setdefault(index, {}).setdefault(size, {k: v for k, v in kwargs.items()
                                                                    if k != "hidden_states"})
            if index == 0:
                if "buffer" not in state:
                    state["buffer"] = torch.empty((n, *hidden.shape[1:]), dtype=hidden.dtype, device=hidden.device)
                start = state["filled"]
                state["buffer"][start: start + size] = hidden
                state["filled"] = start + size
            # a batch size seen before: its layers' arguments are known, the first layer's input suffices
            if index == last or size in state["sizes"]:
                state["sizes"].add(size)
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for start in range(0, n, batch_size):
            batch = windows[start: start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if state["filled"] != n or len(state["kwargs"]) != len(layers):
        raise PatchsparseError("could not capture the decoder layers' inputs (the model skipped its layers?)")
    return LayerInputs(state["buffer"], batch_size, state["extra"], state["kwargs"])


def linears_by_block(linears: dict[str, nn.Linear], path: str, n_layers: int) -> dict[int, dict[str, nn.Linear]]:
    """{block index: {full name: linear}} for the blocks under `path` that hold selected linears."""
    grouped: dict[int, dict[str, nn.Linear]] = {}
    for index in range(n_layers):
        prefix = f"{path}.{index}."
        block = {name: module for name, module in linears.items() if name.startswith(prefix)}
        if block:
            grouped[index] = block
    return grouped


# prune_layer(block index, {full name: linear}, {full name: statistic}) sets the layer's weights
PruneLayer = Callable[[int, dict[str, nn.Linear], dict[str, Any]], None]


@torch.no_grad()
def calibrate_layer_by_layer(model: nn.Module, windows: torch.Tensor | None,
                             make_statistic: Callable[[nn.Linear], Statistic] | None,
                             prune_layer: PruneLayer, *, selection: LayerSelection = LayerSelection(),
                             restore_weights: bool = False, batch_size: int = 1,
                             desc: str = "prune") -> None:
    """Prune decoder layers one at a time, each calibrated on the outputs of the already-pruned ones.

    Without `make_statistic` (magnitude pruning) no forward is run. With `restore_weights`, every
    layer gets its original weights back once its pruned outputs have been passed on.
    """
    path, layers = decoder_layers(model, selection.decoder_path)
    grouped = linears_by_block(select_linears(model, selection), path, len(layers))
    last_block = max(grouped)
    inputs = None
    if make_statistic is not None:
        if windows is None or windows.shape[0] == 0:
            raise PatchsparseError("calibration needs at least one window")
        inputs = capture_layer_inputs(model, windows, layers, batch_size)
    for index in progress(range(last_block + 1), desc=desc, unit="layer"):
        layer, block = layers[index], grouped.get(index, {})
        stats: dict[str, Any] = {}
        if inputs is not None and block:
            stats = {name: make_statistic(linear) for name, linear in block.items()}
            handles = [linear.register_forward_pre_hook(_accumulate_into(stats[name]))
                       for name, linear in block.items()]
            try:
                inputs.run(layer, index, write_outputs=False)
            finally:
                for handle in handles:
                    handle.remove()
        originals = {name: linear.weight.detach().clone() for name, linear in block.items()} if restore_weights else {}
        try:
            prune_layer(index, block, stats)
            del stats
            if inputs is not None and index < last_block:
                inputs.run(layer, index, write_outputs=True)
        finally:
            for name, weight in originals.items():
                block[name].weight.copy_(weight)


def _accumulate_into(stat: Statistic) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        stat.accumulate(args[0])
    return hook
