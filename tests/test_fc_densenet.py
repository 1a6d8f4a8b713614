"""FC-DenseNet (Jégou et al. 2017): the paper's channel table and parameter counts, shapes, modes, export."""

from __future__ import annotations

import pytest
import torch

from seg_densenet.models import FCDenseNet, fc_densenet56, fc_densenet67, fc_densenet103
from seg_densenet.models.layers import DenseBlock, TransposedUp


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread than on two, and stay fast on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**kw) -> FCDenseNet:
    """A 5-pool FC-DenseNet small enough for many forward/backward passes."""
    args = dict(in_channels=1, num_classes=3, growth_rate=4, n_layers_per_block=2, n_filters_first_conv=8)
    return FCDenseNet(**{**args, **kw})


def test_fc_densenet103_channel_plan_is_the_papers_table():
    model = fc_densenet103(3, 11)
    assert model.channel_plan == [48, 112, 192, 304, 464, 656, 896, 1088, 816, 576, 384, 256]
    assert model.final_conv.in_channels == 256
    # Transitions up see only the previous block's new maps: 15*16, 12*16, 10*16, 7*16, 5*16.
    assert [tu.conv.in_channels for tu in model.transitions_up] == [240, 192, 160, 112, 80]


@pytest.mark.parametrize(
    "factory, expected", [(fc_densenet56, 1_376_795), (fc_densenet67, 3_463_243), (fc_densenet103, 9_322_091)]
)
def test_parameter_counts_match_the_paper(factory, expected):
    count = n_params(factory(in_channels=3, num_classes=11))
    assert abs(count - expected) <= 0.005 * expected, count


def test_upsampling_the_whole_bottleneck_stack_would_give_17_2m_parameters():
    """The classic wiring mistake: the first transition up takes the bottleneck's 896-map stack."""
    model = fc_densenet103(3, 11)
    model.bottleneck.keep_input = True
    model.transitions_up[0] = TransposedUp(896, 896)
    model.up_blocks[0] = DenseBlock(896 + 656, 12, 16, keep_input=False)
    assert n_params(model) == 17_179_003
    with torch.no_grad():  # the mis-wired net still runs, so only the count gives it away
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 11, 32, 32)


@pytest.mark.parametrize(
    "in_channels, num_classes, size", [(1, 2, (32, 32)), (1, 4, (45, 38)), (3, 2, (33, 40)), (3, 4, (35, 32))]
)
def test_fc_densenet56_forward_backward_grid(in_channels, num_classes, size):
    torch.manual_seed(0)
    model = fc_densenet56(in_channels=in_channels, num_classes=num_classes)
    x = torch.randn(2, in_channels, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, num_classes, *size)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("size", [(216, 256), (97, 131), (64, 64)])
def test_logits_keep_the_input_size(size):
    model = tiny()
    x = torch.randn(2, 1, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 3, *size)
    out.mean().backward()
    assert x.grad.shape == x.shape


def test_too_small_input_says_what_padding_to_use():
    with pytest.raises(ValueError, match="pad the image to at least 32x32"):
        tiny()(torch.randn(1, 1, 31, 64))


def test_n_layers_per_block_list_needs_2_n_pool_plus_1_entries():
    with pytest.raises(ValueError, match="11 entries"):
        tiny(n_layers_per_block=[2, 2, 2])


def test_memory_efficient_mode_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain = tiny(drop_rate=0.2)
    efficient = tiny(drop_rate=0.2, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 40, 36)
    results = []
    for model in (plain, efficient):
        torch.manual_seed(1)  # same dropout masks
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.square().mean().backward()
        results.append((out, xi.grad, [p.grad for p in model.parameters()]))
    (out_a, gx_a, g_a), (out_b, gx_b, g_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    torch.testing.assert_close(gx_a, gx_b)
    for ga, gb in zip(g_a, g_b):
        torch.testing.assert_close(ga, gb)
    # Recomputation must not run BN twice in a way that moves the running statistics differently.
    torch.testing.assert_close(plain.state_dict(), efficient.state_dict())


def test_mc_dropout_keeps_dropout_active_in_eval_mode():
    x = torch.randn(1, 1, 32, 32)
    model = tiny(drop_rate=0.5).eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.enable_mc_dropout(True)
        assert not torch.equal(model(x), model(x))
        model.enable_mc_dropout(False)
        assert torch.equal(model(x), model(x))
    model = tiny(drop_rate=0.5, mc_dropout=True).eval()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_torch_export_matches_eager():
    torch.manual_seed(0)
    model = tiny(drop_rate=0.2).eval()
    x = torch.randn(1, 1, 48, 40)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))
