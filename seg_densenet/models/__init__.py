"""Networks: the DenseNet classifier, FC-DenseNet, DenseUNet, the smp U-Net baseline, and build_model."""

from seg_densenet.models.dense_unet import DenseUNet
from seg_densenet.models.densenet import (
    DenseNet,
    build_densenet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet_bc,
)
from seg_densenet.models.factory import MODEL_NAMES, build_model
from seg_densenet.models.fc_densenet import FCDenseNet, fc_densenet56, fc_densenet67, fc_densenet103
from seg_densenet.models.smp_unet import smp_unet
from seg_densenet.models.weights import load_pretrained

__all__ = [
    "MODEL_NAMES",
    "DenseNet",
    "DenseUNet",
    "FCDenseNet",
    "build_densenet",
    "build_model",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet_bc",
    "fc_densenet56",
    "fc_densenet67",
    "fc_densenet103",
    "load_pretrained",
    "smp_unet",
]
