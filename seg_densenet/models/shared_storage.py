"""Shared concatenation storage for dense blocks (Pleiss et al. 2017, "Memory-Efficient Implementation
of DenseNets", section 3).

A dense block's layer l reads the concatenation of the block input and all earlier layers' outputs.
Concatenating anew for every layer copies O(L^2) maps, and autograd keeps every one of those copies
for BN's backward: the quadratic memory of naive DenseNets. Here the block allocates one buffer for its
final stack, writes each new map into it once, and gives layer l a view of its first channels. BN
then saves a view of the buffer instead of its own copy, so the block keeps one linear-size buffer.

The views are made by :class:`SharedConcat`, an autograd function whose backward is that of
``torch.cat`` (the gradient split per input). The maps are written through an alias of the buffer that
autograd does not track (``.data``): each write fills channels no earlier view covers, so no saved view
changes. For channels-last maps, while tracing (``torch.compile``, ``torch.export``, TorchScript), and
inside :func:`per_layer_concatenation` (for comparisons), blocks concatenate anew for every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["SharedConcat", "dense_block_forward", "per_layer_concatenation"]

_per_layer = False


class SharedConcat(torch.autograd.Function):
    """``torch.cat(features, 1)`` as the view ``storage[:, start : start + sum C_i]``, into which the
    caller has already written the features; backward splits the gradient per feature."""

    @staticmethod
    def forward(ctx, storage: Tensor, start: int, *features: Tensor) -> Tensor:
        ctx.sizes = [f.shape[1] for f in features]
        return storage.narrow(1, start, sum(ctx.sizes))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, None, *grad.split(ctx.sizes, 1))


@contextlib.contextmanager
def per_layer_concatenation() -> Iterator[None]:
    """Within this context dense blocks concatenate anew for every layer, as without shared storage."""
    global _per_layer
    previous, _per_layer = _per_layer, True
    try:
        yield
    finally:
        _per_layer = previous


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def dense_block_forward(
    layers: Sequence[Callable[[list[Tensor]], Tensor]], x: Tensor, growth_rate: int, keep_input: bool = True
) -> Tensor:
    """Run dense ``layers`` on ``x`` ``(B, C, H, W)``: layer l gets ``[cat(x, y_1 .. y_{l-1})]`` and adds
    ``growth_rate`` maps y_l. Returns ``cat(x, y_1 .. y_L)`` (``keep_input``) or ``cat(y_1 .. y_L)``.

    Outputs and gradients are those of concatenating per layer, up to the summation order of BN's
    statistics over a strided view.
    """
    # A channel slice of an NHWC buffer is strided in every dim, which BN and conv kernels handle slowly
    # (a DenseUNet training step took 1.6x as long): channels-last maps are concatenated per layer.
    channels_last = (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    )
    if _per_layer or channels_last or _tracing() or not layers:
        features = [x]
        for layer in layers:
            features.append(layer(features))
        return torch.cat(features if keep_input else features[1:], 1)
    b, c, h, w = x.shape
    storage = x.new_empty((b, c + growth_rate * len(layers), h, w))
    writer = storage.data  # untracked alias: writes do not bump the version the views were saved at
    writer.narrow(1, 0, c).copy_(x)
    features = [x]
    for layer in layers:
        new = layer([SharedConcat.apply(storage, 0, *features)])
        writer.narrow(1, c + growth_rate * (len(features) - 1), growth_rate).copy_(new)
        features.append(new)
    if keep_input:
        return SharedConcat.apply(storage, 0, *features)
    return SharedConcat.apply(storage, c, *features[1:])
