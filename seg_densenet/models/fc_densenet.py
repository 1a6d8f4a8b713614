"""FC-DenseNet ("The One Hundred Layers Tiramisu", Jégou et al., CVPRW 2017).

Down path: 3x3 conv to ``n_filters_first_conv`` maps, then ``n_pool`` times a dense block that keeps its
whole stack followed by a transition down (BN-ReLU-1x1 conv-dropout-2x2 max pool). Bottleneck: a dense
block. Up path: a 3x3 stride-2 transposed conv applied only to the maps the previous block produced
(not its whole stack; upsampling the whole 896-map bottleneck stack would give 17,179,003 parameters
instead of 9,322,091 for FC-DenseNet103), concatenated with the skip, then a dense block that passes on only
its new maps, except the last, whose whole stack feeds the 1x1 classifier.

Input sizes: no padding. Each 2x2 max pool floors (H -> H//2); each transposed conv maps h to 2h+1,
which is then centre-cropped to the skip's exact size, so any H, W >= 2**n_pool work (e.g. 97x131)
and the logits have the input's H and W.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from seg_densenet.models.layers import (
    DenseBlock,
    TransitionDown,
    TransposedUp,
    init_weights,
    set_mc_dropout,
)


class FCDenseNet(nn.Module):
    """Fully convolutional DenseNet for semantic segmentation.

    Args:
        in_channels: image channels (1 for cine MRI).
        num_classes: output classes (logit maps).
        growth_rate: k, maps added per dense layer.
        n_layers_per_block: layers per dense block; an int (same for all) or ``2 * n_pool + 1`` ints
            (down blocks, bottleneck, up blocks).
        n_filters_first_conv: maps of the first 3x3 conv (48 in the paper).
        drop_rate: dropout after every conv of dense layers and transitions down (0.2 in the paper).
        memory_efficient: recompute each dense layer's concat-BN-ReLU in backward instead of
            storing it (same outputs and gradients, less memory, slower).
        mc_dropout: keep dropout active in eval mode (Monte-Carlo dropout for uncertainty maps).

    Attributes:
        channel_plan: running channel counts as in the paper's Table 2: first conv, the stack after each
            down block, the bottleneck stack, the whole stack of each up block (for FC-DenseNet103:
            48, 112, 192, 304, 464, 656, 896, 1088, 816, 576, 384, 256).

    Forward: ``(B, in_channels, H, W)`` float -> logits ``(B, num_classes, H, W)``; H, W >= 2**n_pool.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 11,
        growth_rate: int = 16,
        n_layers_per_block: int | Sequence[int] = 5,
        n_filters_first_conv: int = 48,
        drop_rate: float = 0.2,
        memory_efficient: bool = False,
        mc_dropout: bool = False,
        n_pool: int = 5,
    ) -> None:
        super().__init__()
        if isinstance(n_layers_per_block, int):
            n_layers_per_block = [n_layers_per_block] * (2 * n_pool + 1)
        n_layers_per_block = list(n_layers_per_block)
        if len(n_layers_per_block) != 2 * n_pool + 1:
            raise ValueError(
                f"n_layers_per_block needs 2 * n_pool + 1 = {2 * n_pool + 1} entries, got {len(n_layers_per_block)}"
            )
        self.n_pool = n_pool
        down_layers = n_layers_per_block[:n_pool]
        bottleneck_layers = n_layers_per_block[n_pool]
        up_layers = n_layers_per_block[n_pool + 1 :]

        def block(c_in: int, n: int, keep_input: bool) -> DenseBlock:
            return DenseBlock(c_in, n, growth_rate, drop_rate, keep_input, memory_efficient)

        self.first_conv = nn.Conv2d(in_channels, n_filters_first_conv, kernel_size=3, padding=1, bias=True)
        num_features = n_filters_first_conv
        self.channel_plan = [num_features]

        self.down_blocks = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        skip_channels = []
        for n in down_layers:
            self.down_blocks.append(block(num_features, n, keep_input=True))
            num_features += n * growth_rate
            skip_channels.append(num_features)
            self.channel_plan.append(num_features)
            self.transitions_down.append(TransitionDown(num_features, drop_rate))

        self.bottleneck = block(num_features, bottleneck_layers, keep_input=False)
        self.channel_plan.append(num_features + bottleneck_layers * growth_rate)
        num_new = bottleneck_layers * growth_rate

        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, (n, skip) in enumerate(zip(up_layers, reversed(skip_channels))):
            last = i == n_pool - 1
            self.transitions_up.append(TransposedUp(num_new, num_new))
            self.up_blocks.append(block(num_new + skip, n, keep_input=last))
            self.channel_plan.append(num_new + skip + n * growth_rate)
            num_new = n * growth_rate

        self.final_conv = nn.Conv2d(self.channel_plan[-1], num_classes, kernel_size=1, bias=True)
        init_weights(self)
        self.enable_mc_dropout(mc_dropout)

    @property
    def min_size(self) -> int:
        """The smallest H and W :meth:`forward` takes: ``2**n_pool``, where the bottleneck is one pixel."""
        return 2**self.n_pool

    def enable_mc_dropout(self, flag: bool = True) -> None:
        """Keep (``True``) or stop keeping (``False``) dropout active in eval mode."""
        set_mc_dropout(self, flag)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)``."""
        min_size = self.min_size
        if x.shape[-2] < min_size or x.shape[-1] < min_size:
            raise ValueError(
                f"FC-DenseNet needs H and W >= {min_size} (2**n_pool), got {tuple(x.shape[-2:])}; "
                f"pad the image to at least {min_size}x{min_size}"
            )
        out = self.first_conv(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down):
            out = block(out)
            skips.append(out)
            out = down(out)
        out = self.bottleneck(out)  # only the new maps go up
        for up, block, skip in zip(self.transitions_up, self.up_blocks, reversed(skips)):
            out = block(torch.cat([up(out, skip.shape[-2:]), skip], 1))  # upsampled first, as in the paper
        return self.final_conv(out)


def fc_densenet56(
    in_channels: int = 3, num_classes: int = 11, drop_rate: float = 0.2, memory_efficient: bool = False, **kw
) -> FCDenseNet:
    """FC-DenseNet56: 4 layers per block, k=12 (1,376,795 parameters for 3 -> 11 classes)."""
    return FCDenseNet(in_channels, num_classes, 12, 4, 48, drop_rate, memory_efficient, **kw)


def fc_densenet67(
    in_channels: int = 3, num_classes: int = 11, drop_rate: float = 0.2, memory_efficient: bool = False, **kw
) -> FCDenseNet:
    """FC-DenseNet67: 5 layers per block, k=16 (3,463,243 parameters for 3 -> 11 classes)."""
    return FCDenseNet(in_channels, num_classes, 16, 5, 48, drop_rate, memory_efficient, **kw)


def fc_densenet103(
    in_channels: int = 3, num_classes: int = 11, drop_rate: float = 0.2, memory_efficient: bool = False, **kw
) -> FCDenseNet:
    """FC-DenseNet103: blocks of 4,5,7,10,12 | 15 | 12,10,7,5,4 layers, k=16 (9,322,091 parameters)."""
    layers = [4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4]
    return FCDenseNet(in_channels, num_classes, 16, layers, 48, drop_rate, memory_efficient, **kw)
