"""Build any model of the project by name (the Hydra ``conf/model/*.yaml`` files call :func:`build_model`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from seg_densenet.errors import ConfigError
from seg_densenet.models.dense_unet import DenseUNet
from seg_densenet.models.densenet import densenet121, densenet161, densenet169, densenet201, densenet_bc
from seg_densenet.models.fc_densenet import fc_densenet56, fc_densenet67, fc_densenet103
from seg_densenet.models.smp_unet import smp_unet

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "densenet121": densenet121,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "densenet161": densenet161,
    "densenet_bc": densenet_bc,
    "fc_densenet56": fc_densenet56,
    "fc_densenet67": fc_densenet67,
    "fc_densenet103": fc_densenet103,
    "dense_unet": DenseUNet,
    "smp_unet": smp_unet,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, **kwargs) -> nn.Module:
    """The model ``name`` (one of :data:`MODEL_NAMES`) built with ``kwargs``.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](**kwargs)
