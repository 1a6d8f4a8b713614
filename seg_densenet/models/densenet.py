"""DenseNet classifier (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

Every layer receives the concatenation of all earlier feature maps of its dense block and adds
``growth_rate`` (k) new maps. The composite function H is BN-ReLU-Conv; DenseNet-B layers put a 1x1
bottleneck conv to ``bn_size * k`` maps before the 3x3 conv to k maps, and DenseNet-C transitions
compress the channel count by ``compression`` (theta) before 2x2 average pooling.

Submodule names are the checkpoint keys of torchvision's implementation (``features.conv0``,
``features.denseblock1.denselayer1.norm1``, ``features.transition1.conv``, ``features.norm5``,
``classifier``), so a torchvision state dict loads with ``strict=True``.

``memory_efficient=True`` follows Pleiss et al. 2017 ("Memory-Efficient Implementation of DenseNets"):
the cheap concat + BN + ReLU in front of every convolution (dense layers and transitions) is not stored
for backward but recomputed from the (already stored) inputs. Convolution outputs are kept, except the
1x1 bottleneck output of layers whose input is narrow (at most 9k maps), where rerunning the 1x1 conv
costs no more than the layer's 3x3 conv and frees its largest stored tensor. The classifier also reruns
its ImageNet stem (conv0-norm0-relu0-pool0, whose stride-2 maps are then the largest stored tensors) in
backward; the DenseUNet encoder keeps it, since relu0 is its first skip anyway. Outputs, gradients and
BN running statistics equal the plain path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg_densenet.errors import ConfigError
from seg_densenet.models.recompute import check_memory_efficient, checkpoint_with_bn, composite_chain
from seg_densenet.models.shared_storage import dense_block_forward

__all__ = [
    "DENSENET_CONFIGS",
    "DenseNet",
    "build_densenet",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet_bc",
    "init_weights",
]

STEMS = ("imagenet", "cifar")

# Architecture of the ImageNet models of the paper (Table 1); DenseNet-161 uses k=48.
DENSENET_CONFIGS: dict[str, dict] = {
    "densenet121": {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64},
    "densenet169": {"growth_rate": 32, "block_config": (6, 12, 32, 32), "num_init_features": 64},
    "densenet201": {"growth_rate": 32, "block_config": (6, 12, 48, 32), "num_init_features": 64},
    "densenet161": {"growth_rate": 48, "block_config": (6, 12, 36, 24), "num_init_features": 96},
}


class _DenseLayer(nn.Module):
    """Bottleneck layer: BN-ReLU-Conv1x1 to ``bn_size * growth_rate`` maps, BN-ReLU-Conv3x3 to
    ``growth_rate`` maps, optional dropout."""

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, width, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = check_memory_efficient(memory_efficient)
        # In memory-efficient mode the bottleneck output (bn_size * k maps) is also recomputed where that
        # costs no more than the 3x3 conv (C_in * 4k <= 9 * 4k * k MACs per pixel): in the early, wide-map
        # layers it is the largest stored tensor but cheap to rerun; later layers keep it.
        self.recompute_bottleneck = num_input_features <= 9 * growth_rate

    def forward(self, prev_features: list[Tensor]) -> Tensor:
        """``prev_features``: maps ``(B, C_i, H, W)`` with sum C_i = num_input_features -> ``(B, k, H, W)``."""
        stage1 = (self.norm1, self.relu1, None, self.conv1)
        stage2 = (self.norm2, self.relu2, None, self.conv2)
        if self.memory_efficient and self.recompute_bottleneck:
            new_features = composite_chain(prev_features, [stage1, stage2], self.memory_efficient)
        else:
            bottleneck = composite_chain(prev_features, [stage1], self.memory_efficient)
            new_features = composite_chain([bottleneck], [stage2], self.memory_efficient)
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; maps ``(B, C, H, W)`` to ``(B, C + num_layers * k, H, W)``."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        layers = list(self.values())
        growth_rate = layers[0].conv2.out_channels if layers else 0
        return dense_block_forward(layers, init_features, growth_rate)


class _Transition(nn.Module):
    """BN-ReLU-Conv1x1 to ``num_output_features`` maps and 2x2 average pooling (halves H and W).

    The pooling runs before the 1x1 conv: both are linear, so the result is the same up to rounding,
    with a quarter of the conv's work and no full-resolution conv output to store.
    """

    def __init__(self, num_input_features: int, num_output_features: int, memory_efficient: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.memory_efficient = check_memory_efficient(memory_efficient)

    def forward(self, x: Tensor) -> Tensor:
        return composite_chain([x], [(self.norm, self.relu, self.pool, self.conv)], self.memory_efficient)


def init_weights(module: nn.Module) -> None:
    """Initialise ``module`` and its children as torchvision does: Kaiming-normal convs, BN weight 1 and
    bias 0, linear bias 0 (linear weight keeps PyTorch's default uniform init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
            nn.init.constant_(m.bias, 0)


def _stem(
    stem: str, in_channels: int, num_init_features: int
) -> tuple[list, set[str], list[int], list[int], int]:
    """The stem's named layers, its feature taps with their channels and strides, and the stride of
    the first dense block: ImageNet 7x7/2 conv, BN, ReLU, 3x3/2 max pool; CIFAR 3x3/1 conv."""
    if stem == "imagenet":
        layers = [
            (
                "conv0",
                nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False),
            ),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]
        return layers, {"relu0"}, [num_init_features], [2], 4
    layers = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=3, padding=1, bias=False))]
    return layers, set(), [], [], 1


class DenseNet(nn.Module):
    """DenseNet-BC classifier.

    Args:
        growth_rate: k, maps added by each dense layer.
        block_config: number of dense layers per block.
        num_init_features: maps produced by the stem convolution.
        bn_size: bottleneck width factor (1x1 conv to ``bn_size * k`` maps).
        compression: theta, fraction of maps kept by a transition (``int(C * theta)``).
        drop_rate: dropout after each dense layer's 3x3 conv.
        num_classes: classifier outputs; 0 drops the classifier and ``forward`` returns the pooled
            ``(B, num_features)`` features (encoder use).
        in_channels: input image channels (1 for cardiac MRI).
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max pool) or ``"cifar"`` (3x3/1 conv).
        memory_efficient: recompute concat + BN + ReLU (and narrow layers' 1x1 bottleneck) in backward
            instead of storing them; ``"checkpoint"`` does it through ``torch.utils.checkpoint`` (see
            :func:`~seg_densenet.models.recompute.composite_chain`); settable later through the
            ``memory_efficient`` property.

    ``forward(x)``: ``(B, in_channels, H, W)`` float -> logits ``(B, num_classes)``.

    ``forward_features(x)`` returns the encoder taps, high to low resolution, with channels
    ``feature_channels`` and strides ``feature_strides`` (input pixels per map pixel):

    * ImageNet stem: after ``relu0`` (stride 2), after ``denseblock1`` .. ``denseblock{n-1}`` (the dense
      block outputs before their transitions; strides 4, 8, 16), and after ``norm5`` + ReLU (stride 32).
      DenseNet-121: channels ``[64, 256, 512, 1024, 1024]``, strides ``[2, 4, 8, 16, 32]``.
    * CIFAR stem: after ``denseblock1`` .. ``denseblock{n-1}`` and after ``norm5`` + ReLU; strides
      ``[1, 2, 4]`` for three blocks.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        _check_args(
            growth_rate,
            block_config,
            num_init_features,
            bn_size,
            compression,
            drop_rate,
            num_classes,
            in_channels,
            stem,
        )
        layers, taps, channels, strides, stride = _stem(stem, in_channels, num_init_features)
        self._stem_length = len(layers)
        self.features = nn.Sequential()
        for name, module in layers:
            self.features.add_module(name, module)

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate, memory_efficient)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                taps.add(f"denseblock{i + 1}")
                channels.append(num_features)
                strides.append(stride)
                num_out = int(num_features * compression)
                self.features.add_module(
                    f"transition{i + 1}", _Transition(num_features, num_out, memory_efficient)
                )
                num_features = num_out
                stride *= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))

        self.classifier = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.num_features = num_features
        self.feature_channels: list[int] = [*channels, num_features]
        self.feature_strides: list[int] = [*strides, stride]
        self._taps = taps
        init_weights(self)

    @property
    def memory_efficient(self) -> bool | str:
        """How concat + BN + ReLU are recomputed in backward (``False``: stored; ``True``; ``"checkpoint"``,
        :func:`~seg_densenet.models.recompute.composite_chain`); settable on a built model."""
        modes = {m.memory_efficient for m in self.modules() if isinstance(m, (_DenseLayer, _Transition))}
        return modes.pop() if len(modes) == 1 else False

    @memory_efficient.setter
    def memory_efficient(self, value: bool | str) -> None:
        check_memory_efficient(value)
        for m in self.modules():
            if isinstance(m, (_DenseLayer, _Transition)):
                m.memory_efficient = value

    @property
    def min_size(self) -> int:
        """The smallest H and W this network takes: its total stride (32 with the ImageNet stem and 4
        blocks), where the last map is one pixel."""
        return self.feature_strides[-1]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """``(B, in_channels, H, W)`` -> maps ``(B, feature_channels[i], ~H / s_i, ~W / s_i)``, high to low
        resolution (see the class docstring for the tap points)."""
        taps = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in self._taps:
                taps.append(x)
        taps.append(F.relu(x))
        return taps

    def _stem(self, x: Tensor) -> Tensor:
        for module in self.features[: self._stem_length]:
            x = module(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient and self._stem_length > 1 and torch.is_grad_enabled():
            # the ImageNet stem's stride-2 maps (conv0, norm0/relu0, max-pool indices) are the largest
            # stored tensors left; rerunning the stem costs ~4 % of a DenseNet-121 forward
            norms = [m for m in self.features[: self._stem_length] if isinstance(m, nn.BatchNorm2d)]
            x = checkpoint_with_bn(self._stem, x, norms=norms)
        else:
            x = self._stem(x)
        for module in self.features[self._stem_length :]:
            x = module(x)
        out = F.relu(x, inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


def _check_args(
    growth_rate,
    block_config,
    num_init_features,
    bn_size,
    compression,
    drop_rate,
    num_classes,
    in_channels,
    stem,
) -> None:
    positive = {
        "growth_rate": growth_rate,
        "num_init_features": num_init_features,
        "bn_size": bn_size,
        "in_channels": in_channels,
    }
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"DenseNet {name} must be a positive integer, got {value!r}")
    if len(block_config) == 0 or any(not isinstance(n, int) or n < 1 for n in block_config):
        raise ConfigError(
            f"DenseNet block_config must be a non-empty list of positive integers, got {block_config!r}"
        )
    if not 0 < compression <= 1:
        raise ConfigError(f"DenseNet compression must be in (0, 1], got {compression!r}")
    if not 0 <= drop_rate < 1:
        raise ConfigError(f"DenseNet drop_rate must be in [0, 1), got {drop_rate!r}")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"DenseNet num_classes must be a non-negative integer, got {num_classes!r}")
    if stem not in STEMS:
        raise ConfigError(f"DenseNet stem must be one of {', '.join(STEMS)}, got {stem!r}")


def build_densenet(name: str, weights: str | None = None, **overrides) -> DenseNet:
    """DenseNet named in ``DENSENET_CONFIGS``; ``overrides`` replace or add any ``DenseNet`` argument.

    ``weights``: a local weights file, or ``imagenet`` for torchvision's ImageNet file in torch's hub
    cache (:func:`~seg_densenet.models.weights.weights_file`); a classifier of another class count is
    re-initialised, a 1-channel stem gets the sum of the RGB filters.
    """
    if name not in DENSENET_CONFIGS:
        raise ConfigError(f"unknown DenseNet {name!r}; valid names: {', '.join(DENSENET_CONFIGS)}")
    model = DenseNet(**{**DENSENET_CONFIGS[name], **overrides})
    if weights is not None:
        from seg_densenet.models.weights import load_pretrained, weights_file  # weights imports this module

        load_pretrained(model, weights_file(weights, name))
    return model


def densenet121(**kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16, 64 stem maps); 7,978,856 parameters for 3 -> 1000.
    ``kwargs``: any :class:`DenseNet` argument, and ``weights`` (:func:`build_densenet`)."""
    return build_densenet("densenet121", **kwargs)


def densenet169(**kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32, 64 stem maps); 14,149,480 parameters for 3 -> 1000.
    ``kwargs``: any :class:`DenseNet` argument, and ``weights`` (:func:`build_densenet`)."""
    return build_densenet("densenet169", **kwargs)


def densenet201(**kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32, 64 stem maps); 20,013,928 parameters for 3 -> 1000.
    ``kwargs``: any :class:`DenseNet` argument, and ``weights`` (:func:`build_densenet`)."""
    return build_densenet("densenet201", **kwargs)


def densenet161(**kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem maps); 28,681,000 parameters for 3 -> 1000.
    ``kwargs``: any :class:`DenseNet` argument, and ``weights`` (:func:`build_densenet`)."""
    return build_densenet("densenet161", **kwargs)


def densenet_bc(
    depth: int = 100,
    growth_rate: int = 12,
    num_classes: int = 10,
    in_channels: int = 3,
    compression: float = 0.5,
    drop_rate: float = 0.0,
    memory_efficient: bool = False,
) -> DenseNet:
    """CIFAR DenseNet-BC: 3x3 stem conv to 2k maps, three blocks of ``(depth - 4) // 6`` bottleneck layers
    on 32x32, 16x16 and 8x8 maps. Depth 100, k=12, 10 classes: about 0.77 M parameters."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth!r}")
    n = (depth - 4) // 6
    return DenseNet(
        growth_rate=growth_rate,
        block_config=(n, n, n),
        num_init_features=2 * growth_rate,
        bn_size=4,
        compression=compression,
        drop_rate=drop_rate,
        num_classes=num_classes,
        in_channels=in_channels,
        stem="cifar",
        memory_efficient=memory_efficient,
    )
