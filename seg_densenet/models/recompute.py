"""Memory-efficient mode (Pleiss et al. 2017): maps that are cheap to recompute are freed after the
forward pass and recomputed in backward instead of stored.

What is stored and what is recomputed, per dense layer H = Conv(ReLU(BN(cat(inputs)))):

- stored: the layer's inputs (the maps of the block so far, which the block keeps anyway in one shared
  buffer, :mod:`~seg_densenet.models.shared_storage`), BN's batch mean and inverse std, and the conv's
  output (the next layers' input);
- freed after forward, recomputed in backward: the concatenation and the BN + ReLU output. These are the
  layer's largest tensors (all input channels at full size) and cost one elementwise pass to rebuild,
  while the conv, the expensive part, is never run again;
- why: a plain dense block stores a concatenated copy per layer, quadratic in depth; this keeps memory
  linear in depth for a few percent more time per step (DenseUNet training on 2 CPU cores: 0.65x smp
  U-Net's peak memory at 1.28x its speed, plain mode 0.91x at 1.34x; docs/benchmarks.md).

Fallback: ``memory_efficient="checkpoint"`` recomputes the same maps through ``torch.utils.checkpoint``
instead (it also reruns the chain's convolutions), and ``True`` does so under autocast, which the
hand-written backward does not reach.

BN running statistics move once per step, not again in the recomputation (:func:`frozen_bn_statistics`).
Tests compare outputs, gradients and running statistics with plain mode in fp32 and under bf16 autocast
(``tests/test_densenet.py``; the bf16 case also runs on CUDA when a GPU is present).

:func:`composite_chain` runs composite functions H = Conv(ReLU(BN(cat(inputs)))) either plainly or
through :class:`CompositeChainFunction`, which stores only its inputs and walks the chain back by hand.
:func:`checkpoint_with_bn` is ``torch.utils.checkpoint`` for other recomputed parts (the classifier's
stem); :func:`frozen_bn_statistics` keeps a recomputation from moving BN running statistics twice.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

__all__ = [
    "CompositeChainFunction",
    "check_memory_efficient",
    "checkpoint_with_bn",
    "composite_chain",
    "concat",
    "frozen_bn_statistics",
]

# (norm.weight, norm.bias, conv.weight, conv.bias) per stage
PARAMS_PER_STAGE = 4
CHECKPOINT = "checkpoint"
"""``memory_efficient="checkpoint"``: recompute through ``torch.utils.checkpoint`` instead of
:class:`CompositeChainFunction` (the fallback, and what autocast uses)."""


def check_memory_efficient(memory_efficient: bool | str) -> bool | str:
    """``memory_efficient`` itself if it is one of :func:`composite_chain`'s modes, else a ValueError (checked
    once, where a layer is built or its mode set, not on every forward)."""
    if memory_efficient not in (False, True, CHECKPOINT):
        raise ValueError(f"memory_efficient must be false, true or {CHECKPOINT!r}, got {memory_efficient!r}")
    return memory_efficient


@contextlib.contextmanager
def frozen_bn_statistics(*norms: nn.BatchNorm2d) -> Iterator[None]:
    """Context of a backward-time recomputation: the BN layers give the same batch statistics but do
    not move their running statistics (or batch counters) a second time."""
    saved = [
        (norm, norm.momentum, None if norm.num_batches_tracked is None else norm.num_batches_tracked.clone())
        for norm in norms
    ]
    for norm in norms:
        norm.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for norm, momentum, tracked in saved:
            norm.momentum = momentum
            if tracked is not None:
                norm.num_batches_tracked.copy_(tracked)


def checkpoint_with_bn(function, *args: Tensor, norms: Sequence[nn.BatchNorm2d]) -> Tensor:
    """``function(*args)`` whose intermediate tensors are recomputed in backward instead of stored
    (``torch.utils.checkpoint``, non-reentrant); ``norms``: the BN layers inside, kept from updating
    their running statistics twice."""
    return cp.checkpoint(
        function,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), frozen_bn_statistics(*norms)),
    )


def concat(inputs: Sequence[Tensor]) -> Tensor:
    """The maps concatenated along channels (the single map itself, not a copy)."""
    return torch.cat(list(inputs), 1) if len(inputs) > 1 else inputs[0]


def batch_norm_with_statistics(norm: nn.BatchNorm2d, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``norm(x)``, updating running statistics and batch counter as :class:`nn.BatchNorm2d` does, plus
    the batch mean and inverse standard deviation it normalised with (empty where it used the running
    statistics)."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(norm.num_batches_tracked)
    bn_training = norm.training or (norm.running_mean is None and norm.running_var is None)
    if bn_training and x.numel() == x.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    track = not norm.training or norm.track_running_stats
    return torch.ops.aten.native_batch_norm(
        x,
        norm.weight,
        norm.bias,
        norm.running_mean if track else None,
        norm.running_var if track else None,
        bn_training,
        momentum,
        norm.eps,
    )


def normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor) -> Tensor:
    """BN's output from the statistics of its forward pass, in one elementwise pass: ``x * a + b`` with
    ``a = weight * invstd`` and ``b = bias - mean * a`` per channel, as the CPU kernel computes it."""
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


class CompositeChainFunction(torch.autograd.Function):
    """A chain of composites ``x <- conv(pool(relu(norm(x))))`` on ``x = cat(inputs)`` (``pool`` optional)
    that stores only its inputs for backward.

    The concatenation, the BN/ReLU outputs and all but the last convolution output are freed after the
    forward pass and recomputed in backward; BN outputs are recomputed from the batch statistics of the
    forward pass (one elementwise pass instead of BN's statistics passes). The last convolution is never rerun. Backward walks the
    chain with the ATen kernels autograd would run (``convolution_backward``, ``native_batch_norm_backward``,
    the ReLU mask in place) and drops each map as soon as it is used, so about three maps of the widest
    stage are alive at once. BN running statistics are
    updated exactly once (in forward); the recomputation uses the batch statistics (training) or the
    unchanged running statistics (eval), so outputs and gradients equal the plain path.

    ``forward(ctx, stages, *params, *inputs)``: ``stages`` is a tuple of ``(norm, pool, conv)`` modules
    (``pool`` None or stateless) and ``params`` their ``(norm.weight, norm.bias, conv.weight, conv.bias)``
    in order (passed as arguments so that autograd returns their gradients; ``conv.bias`` may be None).
    """

    @staticmethod
    def forward(ctx, stages, *tensors):
        num_params = PARAMS_PER_STAGE * len(stages)
        inputs = tensors[num_params:]
        x = concat(inputs)
        ctx.specs = []
        statistics = []
        for norm, pool, conv in stages:
            x, save_mean, save_invstd = batch_norm_with_statistics(norm, x)
            x = conv(pool(x.relu_()) if pool is not None else x.relu_())
            # Same rule as nn.BatchNorm2d: batch statistics in training or when no running stats exist.
            bn_training = norm.training or (norm.running_mean is None and norm.running_var is None)
            running = (None, None) if bn_training else (norm.running_mean, norm.running_var)
            conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
            ctx.specs.append((bn_training, running, norm.eps, pool, conv_args))
            statistics += [save_mean, save_invstd]
        ctx.num_params = num_params
        ctx.save_for_backward(*tensors, *statistics)
        return x

    @staticmethod
    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad[1:]
        num_params = ctx.num_params
        saved = ctx.saved_tensors
        num_inputs = len(needs) - num_params
        params, inputs = saved[:num_params], saved[num_params : num_params + num_inputs]
        statistics = saved[num_params + num_inputs :]
        # Recompute each stage's BN input x and ReLU output y with the ATen kernels autograd would run,
        # keeping BN's saved statistics, then walk the chain back by hand: no autograd graph holds x, y
        # or their gradients longer than needed, so at most about three maps of the widest stage are
        # alive at once (autograd.grad over a rebuilt graph kept five).
        recomputed = _recompute_chain(ctx.specs, params, inputs, statistics)
        grads: list[Tensor | None] = [None] * len(needs)
        grad = grad_out
        for i in reversed(range(len(ctx.specs))):
            p = PARAMS_PER_STAGE * i
            grad, grads[p : p + PARAMS_PER_STAGE] = _stage_backward(
                grad,
                ctx.specs[i],
                params[p : p + PARAMS_PER_STAGE],
                recomputed,
                inputs,
                needs[p : p + PARAMS_PER_STAGE],
            )
        offset = 0
        for j, t in enumerate(inputs):
            if needs[num_params + j]:
                grads[num_params + j] = grad.narrow(1, offset, t.shape[1])
            offset += t.shape[1]
        return (None, *grads)


def _recompute_chain(specs, params, inputs, statistics) -> list[tuple]:
    """Per stage ``(x, y, pooled, save_mean, save_invstd)``: its BN input (None where it is cheaper to
    redo later), ReLU output, pooled map and BN statistics, recomputed from the chain's inputs."""
    x = concat(inputs)
    recomputed = []
    for i, (bn_training, running, eps, pool, conv_args) in enumerate(specs):
        norm_weight, norm_bias, conv_weight, conv_bias = params[
            PARAMS_PER_STAGE * i : PARAMS_PER_STAGE * (i + 1)
        ]
        save_mean, save_invstd = statistics[2 * i : 2 * i + 2]
        if bn_training:
            y = normalize(x, norm_weight, norm_bias, save_mean, save_invstd)
        else:  # momentum 0: the running statistics were updated once, in forward
            y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
                x, norm_weight, norm_bias, *running, False, 0.0, eps
            )
        y.relu_()
        pooled = pool(y) if pool is not None else y
        # a multi-stage chain (the narrow layers, where the peak is) drops its concatenation until
        # the first stage's BN backward needs it again: it is the cheapest map to redo (a single
        # input is no copy, so dropping it would free nothing)
        drop_x = i == 0 and len(specs) > 1 and len(inputs) > 1
        recomputed.append((None if drop_x else x, y, pooled, save_mean, save_invstd))
        if i < len(specs) - 1:
            x = F.conv2d(pooled, conv_weight, conv_bias, *conv_args)
    return recomputed


def _stage_backward(
    grad: Tensor, spec, params, recomputed: list[tuple], inputs, needs
) -> tuple[Tensor, list]:
    """One stage's backward, conv then pool, ReLU and BN, from the last entry of ``recomputed`` (popped
    here, and each map dropped as soon as it is used): the gradient of the stage's input and those of
    its ``(norm.weight, norm.bias, conv.weight, conv.bias)``."""
    bn_training, running, eps, pool, (stride, padding, dilation, groups) = spec
    norm_weight, norm_bias, conv_weight, conv_bias = params
    x, y, pooled, save_mean, save_invstd = recomputed.pop()
    bias_sizes = None if conv_bias is None else [conv_bias.shape[0]]
    grad, conv_weight_grad, conv_bias_grad = torch.ops.aten.convolution_backward(
        grad, pooled, conv_weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
        [True, needs[2], needs[3] and conv_bias is not None],
    )  # fmt: skip
    if pool is not None:
        with torch.enable_grad():
            leaf = y.detach().requires_grad_()
            (grad,) = torch.autograd.grad(pool(leaf), leaf, grad)
    del pooled
    # ReLU backward in place (grad is a fresh buffer); masked_fill_ with a y <= 0 mask is 9x slower
    torch.ops.aten.threshold_backward.grad_input(grad, y, 0, grad_input=grad)
    del y
    if x is None:
        x = concat(inputs)
    grad, norm_weight_grad, norm_bias_grad = torch.ops.aten.native_batch_norm_backward(
        grad, x, norm_weight, *running, save_mean, save_invstd, bn_training, eps, [True, needs[0], needs[1]],
    )  # fmt: skip
    return grad, [norm_weight_grad, norm_bias_grad, conv_weight_grad, conv_bias_grad]


def composite_chain(
    inputs: list[Tensor], stages: list[tuple[nn.Module, ...]], memory_efficient: bool | str
) -> Tensor:
    """Composite functions H = Conv(ReLU(BN(.))) applied in turn to ``cat(inputs)``, ``(B, C_i, H, W)``
    maps; ``stages`` holds ``(norm, relu, pool, conv)`` modules, ``pool`` None or stateless.

    ``memory_efficient``: ``False`` stores every map; ``True`` runs :class:`CompositeChainFunction`;
    ``"checkpoint"`` (:data:`CHECKPOINT`) runs the plain chain under ``torch.utils.checkpoint``
    (:func:`checkpoint_with_bn`), the library's recomputation: the same maps are freed, at the cost of
    rerunning the chain's convolutions too. Under autocast (bf16-mixed or 16-mixed training) ``True``
    falls back to the checkpoint: the hand-written backward calls the ATen kernels with the forward's
    dtypes, which autocast does not reach (its convolution backward failed on bf16 activations and fp32
    weights), while the checkpoint reruns the forward under the same autocast state.
    The recomputing paths run only when gradients will be needed; without them nothing is stored
    anyway and the plain path is cheaper. The layers check the mode when they are built
    (:func:`check_memory_efficient`).
    """
    params = [t for norm, _, _, conv in stages for t in (norm.weight, norm.bias, conv.weight, conv.bias)]
    needs_grad = any(t is not None and t.requires_grad for t in (*inputs, *params))
    if not (memory_efficient and torch.is_grad_enabled() and needs_grad):
        return _plain_chain(*inputs, stages=stages)
    if memory_efficient == CHECKPOINT or _autocast_on(inputs[0].device):
        norms = [norm for norm, *_ in stages]
        return checkpoint_with_bn(functools.partial(_plain_chain, stages=stages), *inputs, norms=norms)
    specs = tuple((norm, pool, conv) for norm, _, pool, conv in stages)
    return CompositeChainFunction.apply(specs, *params, *inputs)


def _plain_chain(*inputs: Tensor, stages: Sequence[tuple[nn.Module, ...]]) -> Tensor:
    x = concat(inputs)
    for norm, relu, pool, conv in stages:
        x = relu(norm(x))
        x = conv(pool(x) if pool is not None else x)
    return x


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (never for devices autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False
