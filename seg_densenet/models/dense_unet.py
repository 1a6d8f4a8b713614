"""DenseUNet: this project's DenseNet classifier as a U-Net encoder with an FC-DenseNet-style decoder.

The model wires three parts: encoder, decoder, head. Another decoder plugs in through ``decoder=`` (one
module and one model yaml: :mod:`seg_densenet.models.unet_decoder` and ``conf/model/densenet_unet.yaml``).

Encoder: :class:`DenseNetEncoder` is the classifier's feature extractor (same ``features.*`` keys, no
classifier), so a torchvision DenseNet file or a classification checkpoint of this project loads into it.
It returns five maps at strides 2, 4, 8, 16, 32 (DenseNet-121: 64, 256, 512, 1024, 1024 channels): after
``relu0``, after dense blocks 1-3, after ``norm5`` + ReLU.

Decoder: :class:`DenseDecoder` climbs back one stride-2 step per stage, 32 -> 16 -> 8 -> 4 -> 2 -> 1. Each
stage upsamples (3x3 stride-2 transposed conv, or bilinear resize + 3x3 conv) to the skip's exact size,
concatenates the skip, and runs a dense block of BN-ReLU-3x3 conv-dropout layers that passes on only its
new maps. The last stage has no skip (it reaches the input resolution) and keeps its whole stack.

Head: :class:`SegmentationHead`, BN-ReLU-1x1 conv to logits at the input's H and W.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from seg_densenet.errors import ConfigError
from seg_densenet.models.densenet import DENSENET_CONFIGS, DenseNet
from seg_densenet.models.layers import (
    BilinearUp,
    DenseBlock,
    TransposedUp,
    decoder_stages,
    init_weights,
    pad_to_multiple,
    padded_forward,
    per_stage,
    set_mc_dropout,
)
from seg_densenet.models.weights import load_pretrained, weights_file

UPSAMPLE_MODES = {"transposed": TransposedUp, "bilinear": BilinearUp}
# DenseUNet arguments that set its encoder's DenseNet architecture, under the paper's names
ENCODER_ARCHITECTURE = ("growth_rate", "block_config", "num_init_features", "bn_size")


class DenseNetEncoder(DenseNet):
    """The DenseNet classifier without its classifier; ``forward`` returns the five encoder taps.

    Being a :class:`DenseNet` (built with ``num_classes=0``), its state-dict keys are the classifier's
    ``features.*`` keys, so classification weights load unchanged.

    Args:
        name: ``densenet121``, ``densenet169``, ``densenet201`` or ``densenet161``.
        in_channels: image channels.
        weights: optional local weights file for :func:`load_pretrained` (torchvision ``.pth``, this
            project's classification ``.ckpt``, safetensors), or ``imagenet``: torchvision's ImageNet
            file of ``name`` in torch's hub cache (:func:`weights_file`); a 3-channel stem is summed to
            1 channel.
        memory_efficient: recompute concat + BN + ReLU of the dense layers in backward.
        **overrides: architecture overrides (``growth_rate``, ``block_config``, ``num_init_features``, ...).

    Forward: ``(B, in_channels, H, W)`` -> list of 5 maps ``(B, feature_channels[i], H_i, W_i)``, strides
    ``feature_strides`` = 2, 4, 8, 16, 32 (sizes round up at the stem, down at transitions).
    """

    def __init__(
        self,
        name: str = "densenet121",
        in_channels: int = 1,
        weights: str | None = None,
        memory_efficient: bool = False,
        **overrides,
    ) -> None:
        if name not in DENSENET_CONFIGS:
            raise ConfigError(
                f"unknown DenseUNet encoder {name!r}; valid names: {', '.join(DENSENET_CONFIGS)}"
            )
        if overrides.get("stem", "imagenet") != "imagenet":
            raise ConfigError("DenseUNet encoder needs stem='imagenet' (taps at strides 2, 4, 8, 16, 32)")
        config = {**DENSENET_CONFIGS[name], **overrides}
        super().__init__(**config, in_channels=in_channels, num_classes=0, memory_efficient=memory_efficient)
        if len(self.feature_channels) != 5:
            raise ConfigError(
                f"DenseUNet encoder needs 4 dense blocks (5 taps), got block_config={list(config['block_config'])}"
            )
        if weights is not None:
            load_pretrained(self, weights_file(weights, name))

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


class DenseDecoder(nn.Module):
    """Dense-block decoder built from the encoder's channel plan.

    Args:
        encoder_channels: channels of the encoder taps, high to low resolution (e.g. 64, 256, 512, 1024,
            1024). The last is the bottleneck; the others are skips.
        decoder_layers: dense layers per stage, deep to shallow, one per stride-2 step (len(encoder
            channels) entries: one per skip plus the full-resolution stage; 0 makes a stage upsample only).
        growth_rate: k of the decoder's dense layers.
        upsample: ``"transposed"`` (3x3 stride-2 transposed conv, cropped) or ``"bilinear"`` (resize + 3x3
            conv); both land on the skip's exact size.
        drop_rate: dropout after each decoder conv.
        memory_efficient: recompute each dense layer's concat-BN-ReLU in backward instead of storing it.
        input_channels: channels of the input image concatenated to the full-resolution stage as its
            skip (U-Net's full-resolution skip, which the DenseNet encoder lacks: its first tap is at
            stride 2); 0: no such skip.

    Widths: stage i's upsampling outputs ``growth_rate * max(decoder_layers[i], 1)`` maps, as many as its
    dense block adds (so stage 0 compresses the 1024-map bottleneck of DenseNet-121 right away, and a
    0-layer last stage carries only k maps at full resolution). Stages with a skip pass on only their new
    maps; the last stage passes on its whole stack, ``out_channels`` maps.

    Forward: list of encoder maps plus the output size (H, W) -> ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_layers: Sequence[int] = (4, 4, 2, 2, 0),
        growth_rate: int = 16,
        upsample: str = "transposed",
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        input_channels: int = 0,
    ) -> None:
        super().__init__()
        decoder_layers = per_stage(decoder_layers, encoder_channels, "decoder_layers")
        if upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"unknown upsample {upsample!r}; valid: {', '.join(UPSAMPLE_MODES)}")
        if any(n < 0 for n in decoder_layers):
            raise ConfigError(f"decoder_layers must be >= 0, got {decoder_layers}")
        up_class = UPSAMPLE_MODES[upsample]
        # the full-resolution stage's skip is the input image, if any
        skip_channels = [*reversed(encoder_channels[:-1]), input_channels]
        self.input_skip = input_channels > 0
        num_features = encoder_channels[-1]
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i, (num_layers, skip) in enumerate(zip(decoder_layers, skip_channels)):
            width = growth_rate * max(num_layers, 1)
            last = i == len(decoder_layers) - 1
            self.ups.append(up_class(num_features, width))
            block = DenseBlock(width + skip, num_layers, growth_rate, drop_rate, last, memory_efficient)
            self.blocks.append(block)
            num_features = block.num_output_features
        self.out_channels = num_features

    def forward(
        self, features: list[Tensor], size: tuple[int, int] | torch.Size, image: Tensor | None = None
    ) -> Tensor:
        """``features``: encoder maps high to low resolution; ``size``: (H, W) of the logits; ``image``:
        the input, needed when the decoder was built with ``input_channels``."""
        return self.forward_stages(features, size, image)[-1]

    def forward_stages(
        self, features: list[Tensor], size: tuple[int, int] | torch.Size, image: Tensor | None = None
    ) -> list[Tensor]:
        """The output of every stage, deep (stride 16) to shallow (the last is :meth:`forward`'s)."""
        if self.input_skip and image is None:
            raise ValueError("this decoder concatenates the input image at full resolution: pass image=")
        x = features[-1]
        outputs = []
        stages = decoder_stages(features, size, image if self.input_skip else None)
        for up, block, (target, skip) in zip(self.ups, self.blocks, stages):
            x = up(x, target)
            x = block(x if skip is None else torch.cat([x, skip], 1))
            outputs.append(x)
        return outputs

    @property
    def stage_channels(self) -> list[int]:
        """Channels of each stage's output, deep to shallow."""
        return [block.num_output_features for block in self.blocks]


class SegmentationHead(nn.Module):
    """BN-ReLU-1x1 conv: ``(B, in_channels, H, W)`` decoder maps -> ``(B, num_classes, H, W)`` logits.

    The decoder's last maps are raw conv outputs, so they are normalised and rectified first, as the
    DenseNet classifier does with ``norm5`` before its linear layer.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.relu(self.norm(x)))


class DenseUNet(nn.Module):
    """U-Net with a DenseNet encoder and a dense-block decoder; wires encoder, decoder and head.

    Args:
        encoder: ``densenet121`` | ``densenet169`` | ``densenet201`` | ``densenet161``.
        in_channels: image channels (1 for cine MRI).
        num_classes: output classes (4 for ACDC: background, RV, myocardium, LV).
        encoder_weights: optional local weights file for the encoder (see :class:`DenseNetEncoder`).
        growth_rate, block_config, num_init_features, bn_size: the encoder's DenseNet architecture
            (Huang et al.'s k, layers per block, stem width, bottleneck factor); ``None`` keeps the value
            of ``encoder`` (DenseNet-121: 32, (6, 12, 24, 16), 64, 4).
        encoder_params: further encoder overrides (e.g. ``{"compression": 0.5}``); the named
            arguments above take precedence.
        decoder_layers: dense layers per decoder stage, deep (stride 16) to shallow (stride 1).
        decoder_growth_rate: k of the decoder's dense layers.
        upsample: ``"transposed"`` or ``"bilinear"``.
        drop_rate: dropout in the decoder (the encoder keeps the classifier's architecture, no dropout).
        memory_efficient: memory-efficient dense layers in encoder and decoder (same outputs and
            gradients, less memory, slower); ``"checkpoint"``: through ``torch.utils.checkpoint``
            (:func:`~seg_densenet.models.recompute.composite_chain`).
        mc_dropout: keep the decoder's dropout active in eval mode (Monte-Carlo dropout).
        input_skip: concatenate the input image to the decoder's full-resolution stage (a U-Net's
            first skip), which sharpens boundaries at little cost; give that stage at least one layer.
        deep_supervision: ``n`` > 0 adds a head to each of the ``n`` decoder stages before the last
            (strides 2, 4, ...); in training mode ``forward`` then returns ``(logits, aux_stride2, ...)``,
            which :func:`~seg_densenet.lit.losses.deep_supervision_loss` weighs 1, 1/2, 1/4, ... as in
            nnU-Net (Isensee et al.'s ACDC entry used it). Evaluation mode returns the logits alone, so
            prediction and export are unchanged. Dense decoder only.
        decoder: another decoder instead of the dense one: a factory (in config, a ``_partial_: true``
            node whose ``_target_`` is the decoder class, e.g. :class:`~seg_densenet.models.unet_decoder.
            UNetDecoder`) called with ``encoder_channels`` and ``input_channels``, returning a module with
            ``out_channels`` whose ``forward(features, size, image)`` gives ``(B, out_channels, H, W)``.
            ``None``: the dense decoder of ``decoder_layers``, ``decoder_growth_rate``, ``upsample`` and
            ``drop_rate``, which are then unused.

    Forward: ``(B, in_channels, H, W)`` float -> logits ``(B, num_classes, H, W)``, any H, W >= 32. The
    input is reflect-padded to multiples of 32 (the encoder's stride) and the logits cropped back, so
    that every size gets the decoder-to-skip alignment of the (multiple-of-32) training crops.
    """

    size_multiple = 32
    min_size = 32
    """The smallest H and W :meth:`forward` takes (the reflect padding needs the input at least as large
    as what it adds); :class:`~seg_densenet.inference.predictor.Predictor` pads smaller images up to it."""

    def __init__(
        self,
        encoder: str = "densenet121",
        in_channels: int = 1,
        num_classes: int = 4,
        encoder_weights: str | None = None,
        growth_rate: int | None = None,
        block_config: Sequence[int] | None = None,
        num_init_features: int | None = None,
        bn_size: int | None = None,
        encoder_params: dict | None = None,
        decoder_layers: Sequence[int] = (4, 4, 2, 2, 0),
        decoder_growth_rate: int = 16,
        upsample: str = "transposed",
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        mc_dropout: bool = False,
        input_skip: bool = False,
        decoder: Callable[..., nn.Module] | None = None,
        deep_supervision: int = 0,
    ) -> None:
        super().__init__()
        named = dict(zip(ENCODER_ARCHITECTURE, (growth_rate, block_config, num_init_features, bn_size)))
        overrides = {**dict(encoder_params or {}), **{k: v for k, v in named.items() if v is not None}}
        self.encoder = DenseNetEncoder(encoder, in_channels, encoder_weights, memory_efficient, **overrides)
        input_channels = in_channels if input_skip else 0
        if decoder is None:
            self.decoder = DenseDecoder(
                self.encoder.feature_channels,
                decoder_layers,
                decoder_growth_rate,
                upsample,
                drop_rate,
                memory_efficient,
                input_channels,
            )
        else:
            self.decoder = decoder(
                encoder_channels=self.encoder.feature_channels, input_channels=input_channels
            )
        self.head = SegmentationHead(self.decoder.out_channels, num_classes)
        self.aux_heads = self._aux_heads(deep_supervision, num_classes)
        init_weights(self.decoder)
        init_weights(self.head)
        init_weights(self.aux_heads)
        self.enable_mc_dropout(mc_dropout)

    def _aux_heads(self, n: int, num_classes: int) -> nn.ModuleList:
        if n == 0:
            return nn.ModuleList()
        channels = getattr(self.decoder, "stage_channels", None)
        if channels is None:
            raise ConfigError("deep_supervision needs the dense decoder (decoder: null)")
        if not 0 < n < len(channels):
            raise ConfigError(
                f"deep_supervision must be 0..{len(channels) - 1} (decoder stages before the last), got {n}"
            )
        # the stages just before the last, shallow to deep: strides 2, 4, ...
        return nn.ModuleList(SegmentationHead(c, num_classes) for c in channels[-2 : -2 - n : -1])

    def enable_mc_dropout(self, flag: bool = True) -> None:
        """Keep (``True``) or stop keeping (``False``) the decoder's dropout active in eval mode."""
        set_mc_dropout(self, flag)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        """``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)`` (in training with deep
        supervision: the logits and the auxiliary logits at strides 2, 4, ...)."""
        if x.shape[-2] < self.min_size or x.shape[-1] < self.min_size:
            raise ValueError(
                f"DenseUNet needs H and W >= {self.min_size}, got {tuple(x.shape[-2:])}; "
                f"pad the image to {self.min_size}x{self.min_size}"
            )
        if self.training and len(self.aux_heads):
            return self._forward_supervised(x)
        return padded_forward(self._forward_padded, x, self.size_multiple)

    def _forward_padded(self, x: Tensor) -> Tensor:
        return self.head(self.decoder(self.encoder(x), x.shape[-2:], x))

    def _forward_supervised(self, x: Tensor) -> tuple[Tensor, ...]:
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.size_multiple)
        stages = self.decoder.forward_stages(self.encoder(padded), padded.shape[-2:], padded)
        logits = self.head(stages[-1]).narrow(-2, 0, h).narrow(-1, 0, w)
        aux = []
        for i, (head, stage) in enumerate(zip(self.aux_heads, reversed(stages[:-1])), start=1):
            stride = 2**i  # the padding sits at the bottom and right: keep the maps of the input's pixels
            aux.append(head(stage).narrow(-2, 0, -(-h // stride)).narrow(-1, 0, -(-w // stride)))
        return (logits, *aux)
