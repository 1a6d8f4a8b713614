"""Building blocks shared by the segmentation networks (FC-DenseNet, DenseUNet decoder).

The dense layer here is the FC-DenseNet one (Jégou et al. 2017): BN-ReLU-3x3 conv (k maps)-dropout,
without the 1x1 bottleneck of the classification DenseNet. A :class:`DenseBlock` either passes on its
whole stack (input + new maps) or only the maps it produced, which is what keeps the up path of
FC-DenseNet (and the DenseUNet decoder) from growing without bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg_densenet.errors import ConfigError
from seg_densenet.models.recompute import check_memory_efficient, composite_chain
from seg_densenet.models.shared_storage import dense_block_forward


class MCDropout(nn.Dropout):
    """Element-wise dropout that can stay active in eval mode (Monte-Carlo dropout).

    With ``mc=True`` the layer drops activations even after ``model.eval()``, so repeated forward
    passes sample from the approximate posterior (Gal & Ghahramani 2016); prediction uses the spread
    of those samples as an uncertainty map.
    """

    def __init__(self, p: float = 0.0, mc: bool = False) -> None:
        super().__init__(p=p)
        self.mc = mc

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training or self.mc, self.inplace)


def set_mc_dropout(module: nn.Module, flag: bool = True) -> None:
    """Switch Monte-Carlo dropout on or off in every :class:`MCDropout` below ``module``."""
    for m in module.modules():
        if isinstance(m, MCDropout):
            m.mc = flag


def center_crop(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Crop the last two dims of ``x`` (…, H, W) to ``size`` (h, w) around the centre; h <= H, w <= W."""
    h, w = size[0], size[1]
    top = (x.shape[-2] - h) // 2
    left = (x.shape[-1] - w) // 2
    # narrow (not slicing) keeps the output size exactly (h, w), also for symbolic sizes under torch.export
    return x.narrow(-2, top, h).narrow(-1, left, w)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad the bottom and right of ``x`` (B, C, H, W) so that H and W are multiples of ``multiple``
    (H, W >= ``multiple``).

    A network whose strided layers round odd sizes (DenseNet's stem rounds up, its transitions round
    down) aligns its decoder with the skips differently for each size parity; training crops are
    multiples of 32, so padding every input to one keeps inference on the alignment the weights learned
    (on the phantom, whole-volume Dice 0.857 unpadded against 0.922). Reflection continues the anatomy
    without a hard edge; on the same weights it scored as well as or better than replicating the border
    or filling with the image minimum on the validation volumes of the phantom and of ACDC.
    """
    pad_h = (multiple - x.shape[-2] % multiple) % multiple
    pad_w = (multiple - x.shape[-1] % multiple) % multiple
    if not torch.jit.is_tracing() and not (pad_h or pad_w):
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")


def padded_forward(function, x: Tensor, multiple: int) -> Tensor:
    """``function`` run on ``x`` padded by :func:`pad_to_multiple`, its output cropped back to ``x``'s H, W."""
    h, w = x.shape[-2], x.shape[-1]
    return function(pad_to_multiple(x, multiple)).narrow(-2, 0, h).narrow(-1, 0, w)


class _DenseLayer(nn.Module):
    """BN-ReLU-3x3 conv producing ``growth_rate`` maps, then dropout.

    Input is the list of maps seen so far; they are concatenated here so that memory-efficient mode
    can recompute the concatenation and BN output (the largest tensors) in backward instead of storing
    them (:func:`~seg_densenet.models.recompute.composite_chain`, which never reruns the conv). Dropout
    stays outside the recomputed part.
    """

    def __init__(
        self, num_input_features: int, growth_rate: int, drop_rate: float, memory_efficient: bool
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, growth_rate, kernel_size=3, padding=1, bias=True)
        self.drop = MCDropout(drop_rate)
        self.memory_efficient = check_memory_efficient(memory_efficient)

    def forward(self, features: list[Tensor]) -> Tensor:
        """(B, C_i, H, W) maps -> (B, growth_rate, H, W)."""
        stage = (self.norm, self.relu, None, self.conv)
        return self.drop(composite_chain(features, [stage], self.memory_efficient))


class DenseBlock(nn.Module):
    """``num_layers`` dense layers, each seeing the block input and all earlier layers' maps.

    Args:
        num_input_features: channels of the block input.
        num_layers: number of dense layers (each adds ``growth_rate`` maps).
        growth_rate: k, maps produced per layer.
        drop_rate: dropout probability after each conv.
        keep_input: if True return input + new maps (down path, last up block), else only the
            ``num_layers * growth_rate`` new maps (up path; avoids the channel explosion).
        memory_efficient: recompute each layer's concat-BN-ReLU in backward instead of storing it.
    """

    def __init__(
        self,
        num_input_features: int,
        num_layers: int,
        growth_rate: int,
        drop_rate: float = 0.0,
        keep_input: bool = True,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.keep_input = keep_input
        self.growth_rate = growth_rate
        self.num_new_features = num_layers * growth_rate
        self.num_output_features = self.num_new_features + (num_input_features if keep_input else 0)
        self.layers = nn.ModuleList(
            _DenseLayer(num_input_features + i * growth_rate, growth_rate, drop_rate, memory_efficient)
            for i in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, num_output_features, H, W)."""
        return dense_block_forward(self.layers, x, self.growth_rate, self.keep_input)


class TransitionDown(nn.Module):
    """BN-ReLU-1x1 conv (same width)-dropout-2x2 max pool: (B, C, H, W) -> (B, C, H//2, W//2)."""

    def __init__(self, num_features: int, drop_rate: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_features, num_features, kernel_size=1, bias=True)
        self.drop = MCDropout(drop_rate)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.drop(self.conv(self.relu(self.norm(x)))))


class TransposedUp(nn.Module):
    """3x3 stride-2 transposed conv, cropped to the skip's exact size.

    A 3x3, stride-2, unpadded transposed conv maps H to 2H+1, which covers every skip size a
    stride-2 downsampling can leave behind (2H-1, 2H, 2H+1), so a centre crop matches odd sizes too.
    (B, C_in, h, w) -> (B, C_out, H, W) with (H, W) = ``size``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=3, stride=2, bias=True)

    def forward(self, x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        return center_crop(self.conv(x), size)


class BilinearUp(nn.Module):
    """Bilinear resize to the skip's exact size, then 3x3 conv: (B, C_in, h, w) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)

    def forward(self, x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def init_weights(module: nn.Module) -> None:
    """He-uniform convs with zero bias, unit-gamma BN (the FC-DenseNet paper's HeUniform init)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def decoder_stages(
    features: list[Tensor], size, image: Tensor | None
) -> list[tuple[torch.Size, Tensor | None]]:
    """A U-Net decoder's (target size, skip) per stage, deep to shallow: each encoder tap but the
    bottleneck (``features[-1]``) at its own size, then the full-resolution stage at ``size`` with
    ``image`` (or ``None``) as its skip."""
    skips = [*reversed(features[:-1]), image]
    targets = [f.shape[-2:] for f in reversed(features[:-1])] + [torch.Size(size)]
    return list(zip(targets, skips))


def per_stage(values: Sequence[int], encoder_channels: Sequence[int], option: str) -> list[int]:
    """A decoder setting with one integer per stride-2 step (one per encoder tap), checked."""
    values = [int(v) for v in values]
    if len(values) != len(encoder_channels):
        raise ConfigError(
            f"{option} needs {len(encoder_channels)} entries (one per stride-2 step), got {values}"
        )
    return values
