"""Contracts of the DenseNet classifier: sizes of the paper's models, torchvision parity, encoder taps,
and the memory-efficient mode (same numbers, recomputation really happens, less stored)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from seg_densenet.errors import ConfigError
from seg_densenet.models.densenet import (
    DENSENET_CONFIGS,
    DenseNet,
    build_densenet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet_bc,
)

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
"""Marks of a test's CUDA case: ``pytest -m cuda`` (scripts/gpu_check.sh) selects them."""


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _small(**kwargs) -> DenseNet:
    """A DenseNet small enough for CPU tests (3 blocks, k=4)."""
    args = {"growth_rate": 4, "block_config": (2, 3, 2), "num_init_features": 8, "num_classes": 5}
    return DenseNet(**{**args, **kwargs})


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (densenet121, 7_978_856),
        (densenet169, 14_149_480),
        (densenet201, 20_013_928),
        (densenet161, 28_681_000),
    ],
)
def test_imagenet_parameter_counts(factory, expected):
    with torch.device("meta"):  # shapes only: no time spent initialising millions of weights
        assert _num_params(factory()) == expected


def test_densenet_bc_parameter_count():
    with torch.device("meta"):
        assert _num_params(densenet_bc(100, 12, 10)) == pytest.approx(769_210, rel=0.005)


def test_densenet121_channels_after_every_block_and_transition():
    with torch.device("meta"):
        model = densenet121().eval()
        widths = {}
        for name, module in model.features.named_children():
            if name.startswith(("denseblock", "transition")):
                module.register_forward_hook(lambda m, i, o, name=name: widths.__setitem__(name, o.shape[1]))
        model(torch.zeros(1, 3, 224, 224))
    assert list(widths.values()) == [256, 128, 512, 256, 1024, 512, 1024]
    assert model.features.conv0.out_channels == 64


def test_state_dict_keys_match_torchvision():
    with torch.device("meta"):
        ours, ref = densenet121().state_dict(), torchvision.models.densenet121(weights=None).state_dict()
    assert len(ours) == 727
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)


@pytest.fixture(scope="module")
def torchvision_pair():
    torch.manual_seed(0)
    ref = torchvision.models.densenet121(weights=None)
    ours = densenet121()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_eval_outputs_match_torchvision(torchvision_pair):
    ref, ours = torchvision_pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_train_gradients_match_torchvision(torchvision_pair, memory_efficient):
    ref, ours = torchvision_pair
    ours.load_state_dict(ref.state_dict())  # the other parametrisation may have moved running stats
    ours.memory_efficient = memory_efficient
    x = torch.randn(2, 3, 64, 64)
    for model in (ref, ours):
        model.train().zero_grad()
        model(x).square().mean().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=0, msg=name)


def test_forward_features_imagenet_stem():
    model = _small(in_channels=1).eval()
    # stem 8; block1 8 + 2*4 = 16 -> 8; block2 8 + 3*4 = 20 -> 10; block3 10 + 2*4 = 18
    assert model.feature_channels == [8, 16, 20, 18]
    assert model.feature_strides == [2, 4, 8, 16]
    with torch.no_grad():
        taps = model.forward_features(torch.randn(2, 1, 64, 48))
    assert [t.shape for t in taps] == [
        (2, c, 64 // s, 48 // s) for c, s in zip([8, 16, 20, 18], [2, 4, 8, 16])
    ]
    assert torch.all(taps[-1] >= 0)  # after norm5 + ReLU


def test_forward_features_densenet121_channels_and_odd_size():
    with torch.device("meta"):
        model = densenet121(in_channels=1).eval()
        taps = model.forward_features(torch.zeros(1, 1, 97, 130))
    assert model.feature_channels == [64, 256, 512, 1024, 1024]
    assert model.feature_strides == [2, 4, 8, 16, 32]
    assert [t.shape[1] for t in taps] == model.feature_channels
    assert [t.shape[2:] for t in taps] == [(49, 65), (25, 33), (12, 16), (6, 8), (3, 4)]


def test_forward_features_cifar_stem():
    model = densenet_bc(depth=22, growth_rate=4, in_channels=1, num_classes=3).eval()
    with torch.no_grad():
        taps = model.forward_features(torch.randn(2, 1, 32, 32))
        logits = model(torch.randn(2, 1, 32, 32))
    assert model.feature_strides == [1, 2, 4]
    assert [t.shape for t in taps] == [
        (2, c, 32 // s, 32 // s) for c, s in zip(model.feature_channels, [1, 2, 4])
    ]
    assert model.feature_channels == [8 + 12, 10 + 12, 11 + 12]
    assert logits.shape == (2, 3)


def test_encoder_without_classifier_returns_pooled_features():
    model = _small(num_classes=0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, model.num_features)
    assert not any(k.startswith("classifier") for k in model.state_dict())


def test_build_densenet_overrides_and_unknown_name():
    model = build_densenet("densenet121", growth_rate=8, block_config=(2, 2), in_channels=1, num_classes=4)
    assert model.features.conv0.in_channels == 1
    assert model.feature_channels == [64, 80, 56]
    assert set(DENSENET_CONFIGS) == {"densenet121", "densenet169", "densenet201", "densenet161"}
    with pytest.raises(ConfigError, match="densenet121, densenet169, densenet201, densenet161"):
        build_densenet("densenet122")


@pytest.mark.parametrize(
    "bad",
    [{"growth_rate": 0}, {"block_config": ()}, {"compression": 0.0}, {"stem": "tiny"}, {"drop_rate": 1.0}],
)
def test_invalid_arguments_raise_config_error(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        _small(**bad)


def test_densenet_bc_depth_must_be_6n_plus_4():
    with pytest.raises(ConfigError, match="6n \\+ 4"):
        densenet_bc(depth=50)


def test_dropout_only_in_training():
    model = _small(drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model.train()(x)
    b = model(x)
    assert not torch.allclose(a, b)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model(x))


def _train_step(model, x):
    model.train().zero_grad()
    model(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_unknown_memory_efficient_mode_is_refused_when_built_or_set():
    with pytest.raises(ValueError, match="memory_efficient must be"):
        _small(memory_efficient="recompute")
    model = _small()
    with pytest.raises(ValueError, match="memory_efficient must be"):
        model.memory_efficient = "recompute"
    assert model.memory_efficient is False


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("mode", [True, "checkpoint"])
def test_memory_efficient_matches_plain_outputs_gradients_and_running_stats(mode, device):
    torch.manual_seed(0)
    plain = _small(drop_rate=0.0).to(device)
    efficient = _small(memory_efficient=mode).to(device)
    assert efficient.memory_efficient == mode
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 32, 32, device=device)
    grads_plain, grads_efficient = _train_step(plain, x), _train_step(efficient, x)
    tol = 1e-5 if device == "cpu" else 1e-3  # cuDNN convolutions may run in TF32
    for name in grads_plain:
        torch.testing.assert_close(grads_efficient[name], grads_plain[name], atol=tol, rtol=tol, msg=name)
    # BN running statistics move once per step (a recomputing checkpoint would move them twice).
    for (name, a), b in zip(efficient.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(efficient.eval()(x), plain.eval()(x))


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=CUDA)],
)
def test_memory_efficient_matches_plain_under_bf16_autocast(device):
    """Memory-efficient mode under bf16 autocast (``trainer=gpu`` uses bf16-mixed), where it recomputes
    through ``torch.utils.checkpoint``: same outputs and gradients as plain mode up to bf16 rounding, BN
    statistics moved once."""
    torch.manual_seed(0)
    plain = _small(drop_rate=0.0).to(device)
    efficient = _small(memory_efficient=True).to(device)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 32, 32, device=device)
    grads = []
    for model in (plain, efficient):
        with torch.autocast(device, dtype=torch.bfloat16):
            grads.append(_train_step(model, x))
    for name in grads[0]:
        assert grads[1][name].dtype == grads[0][name].dtype == torch.float32, name
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=2e-2, rtol=5e-2, msg=name)
    for (name, a), b in zip(efficient.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2, msg=name)
    assert int(efficient.features.norm0.num_batches_tracked) == 1
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        torch.testing.assert_close(efficient.eval()(x), plain.eval()(x), atol=2e-2, rtol=5e-2)


def test_memory_efficient_gradients_with_frozen_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    plain, efficient = _small(), _small(memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, efficient):
        model.eval().zero_grad()
        model(x).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _OpCounter(TorchDispatchMode):
    """Counts batch-norm and convolution forward kernels run while active (a recomputed BN output is one
    ``addcmul`` with the statistics of the forward pass)."""

    def __init__(self):
        super().__init__()
        self.batch_norm = self.convolution = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "backward" not in name:
            self.batch_norm += "batch_norm" in name or name == "addcmul"
            self.convolution += name == "convolution"
        return func(*args, **(kwargs or {}))


def _count_step(model, x, train=True):
    """Batch-norm and convolution kernels run by the forward and by the backward of one step."""
    model.train(train).zero_grad()
    forward, backward = _OpCounter(), _OpCounter()
    with torch.set_grad_enabled(train), forward:
        out = model(x).square().mean()
    if train:
        with backward:
            out.backward()
    return (forward.batch_norm, forward.convolution), (backward.batch_norm, backward.convolution)


def test_memory_efficient_recomputes_norm_relu_and_only_cheap_bottlenecks():
    x = torch.randn(2, 3, 32, 32)
    # 34 stem maps: the first layer's input (34 maps <= 9k = 36) is narrow enough to rerun its 1x1 conv,
    # the second layer's (38) is not; the later blocks start narrow again.
    model = _small(num_init_features=34)
    layers = [m for m in model.modules() if hasattr(m, "recompute_bottleneck")]
    rerun = sum(m.recompute_bottleneck for m in layers)
    assert 0 < rerun < len(layers)
    num_composites = 2 * len(layers) + 2  # BN-ReLU-Conv: two per dense layer, one per transition
    num_convs = num_composites + 1  # + conv0
    forward, backward = _count_step(model, x)
    assert forward == (num_composites + 2, num_convs)  # + norm0, norm5
    assert backward == (0, 0)  # plain: everything was stored
    model.memory_efficient = True
    forward, backward = _count_step(model, x)
    assert forward == (num_composites + 2, num_convs)
    # Backward reruns every composite's BN + ReLU (their outputs were not stored), the 1x1 bottleneck
    # conv of the narrow layers only, and the stem (conv0, norm0); the other convolutions' outputs are kept.
    assert backward == (num_composites + 1, rerun + 1)
    # Without gradients both modes run the plain forward once.
    for memory_efficient in (False, True):
        model.memory_efficient = memory_efficient
        assert _count_step(model, x, train=False) == ((num_composites + 2, num_convs), (0, 0))


def _saved_bytes(model, x):
    """Bytes autograd keeps for backward during a training forward, parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.parametrize("mode", [True, "checkpoint"])
def test_memory_efficient_stores_much_less_for_backward(mode):
    model = densenet121(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    plain = _saved_bytes(model, x)
    model.memory_efficient = mode
    assert _saved_bytes(model, x) < 0.5 * plain
