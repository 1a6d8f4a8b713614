"""Shared concatenation storage of dense blocks: same results as concatenating per layer, less stored."""

import copy

import pytest
import torch

from seg_densenet.models.densenet import densenet_bc
from seg_densenet.models.layers import DenseBlock
from seg_densenet.models.shared_storage import per_layer_concatenation


def _saved_bytes(module, x):
    """Bytes autograd keeps for backward during a forward of ``module``, parameters excluded."""
    params = {p.data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def _step(module, x):
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.square().mean().backward()
    return out.detach(), x.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("memory_efficient", [False, True, "checkpoint"])
@pytest.mark.parametrize("keep_input", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_block_matches_per_layer_concatenation(memory_efficient, keep_input, channels_last):
    torch.manual_seed(0)
    shared = DenseBlock(6, 4, 3, keep_input=keep_input, memory_efficient=memory_efficient).train()
    reference = copy.deepcopy(shared)
    x = torch.randn(3, 6, 12, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        shared, reference = (m.to(memory_format=torch.channels_last) for m in (shared, reference))
    out_s, gx_s, g_s = _step(shared, x)
    with per_layer_concatenation():
        out_r, gx_r, g_r = _step(reference, x)
    assert out_s.shape == (3, 6 * keep_input + 4 * 3, 12, 10)
    if keep_input:  # the whole buffer or concatenation (without the input: a view of its last channels)
        assert out_s.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
    # NHWC really is NHWC: channels adjacent in memory (a channel slice of an NHWC buffer keeps stride 1)
    assert (out_s.stride(1) == 1) == channels_last and (gx_s.stride(1) == 1) == channels_last
    torch.testing.assert_close(out_s, out_r)
    torch.testing.assert_close(gx_s, gx_r)
    for a, b in zip(g_s, g_r):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(shared.state_dict(), reference.state_dict())


def test_shared_storage_keeps_one_linear_buffer_instead_of_a_copy_per_layer():
    torch.manual_seed(0)
    model = densenet_bc(depth=40, growth_rate=12, num_classes=10).train()
    block = model.features.denseblock1  # 6 bottleneck layers
    x = torch.randn(4, block.denselayer1.norm1.num_features, 16, 16)
    shared = _saved_bytes(block, x)
    with per_layer_concatenation():
        per_layer = _saved_bytes(block, x)
    # per-layer concatenation stores the input copy of layers 2-6 (quadratic in depth); the shared
    # buffer stores the block's 6 x 12 new maps once, next to the block input that both keep
    per_map = x[:, :1].nbytes
    concat_copies = sum(per_map * (x.shape[1] + 12 * i) for i in range(1, 6))
    assert per_layer - shared == concat_copies - per_map * 12 * 6
