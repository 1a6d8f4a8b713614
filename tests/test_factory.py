"""build_model, MODEL_NAMES and the Hydra model configs (conf/model/*.yaml)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import seg_densenet.models
from seg_densenet.config import CONFIG_DIR
from seg_densenet.errors import ConfigError
from seg_densenet.models import (
    MODEL_NAMES,
    DenseNet,
    DenseUNet,
    FCDenseNet,
    build_model,
    densenet121,
    fc_densenet56,
)

MODEL_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forward passes run faster on one intra-op thread than on two, and stay fast on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_model_names():
    assert set(MODEL_NAMES) == {
        "densenet121", "densenet169", "densenet201", "densenet161", "densenet_bc",
        "fc_densenet56", "fc_densenet67", "fc_densenet103", "dense_unet", "smp_unet",
    }  # fmt: skip


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown model 'unet3d'; valid names: densenet121, .*smp_unet"):
        build_model("unet3d")


def test_build_model_passes_kwargs_to_the_named_builder():
    torch.manual_seed(0)
    a = build_model("fc_densenet56", in_channels=1, num_classes=4, drop_rate=0.0)
    torch.manual_seed(0)
    b = fc_densenet56(in_channels=1, num_classes=4, drop_rate=0.0)
    assert isinstance(a, FCDenseNet) and a.final_conv.out_channels == 4
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    c = build_model("densenet121", in_channels=1, num_classes=3)
    assert c.classifier.out_features == 3
    assert sum(p.numel() for p in c.parameters()) == sum(
        p.numel() for p in densenet121(in_channels=1, num_classes=3).parameters()
    )


def test_every_model_config_is_there():
    assert {"fc_densenet56", "fc_densenet67", "fc_densenet103", "dense_unet", "dense_unet_small", "smp_unet",
            "densenet121"} <= set(MODEL_CONFIGS)  # fmt: skip


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_model_config_loads_and_instantiates(config):
    raw = OmegaConf.load(CONFIG_DIR / "model" / f"{config}.yaml")
    assert "_target_" in raw or "defaults" in raw
    # Compose with Hydra so that config inheritance (`defaults: [dense_unet]`) is applied, then resolve
    # the ${data.*} interpolations against a stub parent config, as the training app's config would.
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        composed = compose(overrides=[f"+model={config}"]).model
    cfg = OmegaConf.create({"data": {"in_channels": 1, "num_classes": 4}, "model": composed})
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module)
    # the config names the class or paper builder itself, not a by-name registry
    assert cfg.model["_target_"].rsplit(".", 1)[-1] in seg_densenet.models.__all__
    assert cfg.model["_target_"] != "seg_densenet.models.build_model"
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        out = model.eval()(x)
    expected = (1, 4) if isinstance(model, DenseNet) else (1, 4, 64, 64)
    assert out.shape == expected
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1


def test_dense_unet_small_inherits_from_dense_unet():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        base = compose(overrides=["+model=dense_unet"]).model
        small = compose(overrides=["+model=dense_unet_small"]).model
    assert small.encoder == base.encoder == "densenet121"
    assert small.upsample == base.upsample
    assert small.growth_rate == 12 and base.growth_rate is None
    cfg = OmegaConf.create({"data": {"in_channels": 1, "num_classes": 4}, "model": small})
    model = instantiate(cfg.model)
    assert isinstance(model, DenseUNet)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # light enough for CPU training
