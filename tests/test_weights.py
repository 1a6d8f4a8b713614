"""Contracts of load_pretrained: every accepted file format loads exactly, the stem and classifier adapt,
and everything else fails with a one-line CheckpointError naming the file."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from seg_densenet.errors import CheckpointError, ConfigError
from seg_densenet.models.densenet import DenseNet, densenet121
from seg_densenet.models.weights import load_pretrained

SMALL = {"growth_rate": 4, "block_config": (2, 3), "num_init_features": 8, "num_classes": 7}


@pytest.fixture(scope="module")
def source():
    """A small torchvision DenseNet with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(**SMALL)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))
    return model.eval()


def _assert_same_state(model, state):
    ours = model.state_dict()
    assert list(ours) == list(state)
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def test_torchvision_densenet121_state_dict_loads_exactly(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.densenet121(weights=None).state_dict()
    path = tmp_path / "densenet121.pth"
    torch.save(state, path)
    model = load_pretrained(densenet121(), path)
    _assert_same_state(model, state)


def test_legacy_key_style(tmp_path, source):
    state = source.state_dict()
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    # The original files predate BatchNorm's batch counter.
    legacy = {k: v for k, v in legacy.items() if not k.endswith("num_batches_tracked")}
    torch.save(legacy, tmp_path / "legacy.pth")
    model = load_pretrained(DenseNet(**SMALL), tmp_path / "legacy.pth")
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("prefix", ["model.", "net.", "module.", "model.encoder."])
def test_lightning_checkpoint_and_prefixed_keys(tmp_path, source, prefix):
    state = source.state_dict()
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "hyper_parameters": {"lr": 0.1, "name": "densenet"},
        # Keys outside the model's prefix (a weighted loss, metrics) are not the model's.
        "state_dict": {**{prefix + k: v for k, v in state.items()}, "criterion.weight": torch.ones(7)},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    _assert_same_state(load_pretrained(DenseNet(**SMALL), tmp_path / "last.ckpt"), state)


def test_safetensors(tmp_path, source):
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "weights.safetensors"))
    _assert_same_state(load_pretrained(DenseNet(**SMALL), tmp_path / "weights.safetensors"), state)


def test_one_channel_sum_gives_the_source_response_to_a_grey_image(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "rgb.pth")
    model = load_pretrained(DenseNet(**SMALL, in_channels=1), tmp_path / "rgb.pth").eval()
    expected = source.features.conv0.weight.sum(1, keepdim=True)
    torch.testing.assert_close(model.features.conv0.weight, expected, atol=0, rtol=0)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(torch.cat([x, x, x], 1)), atol=1e-5, rtol=1e-5)


def test_one_channel_mean_and_four_channel_repeat(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "rgb.pth")
    weight = source.features.conv0.weight
    mean = load_pretrained(DenseNet(**SMALL, in_channels=1), tmp_path / "rgb.pth", in_channel_mode="mean")
    torch.testing.assert_close(mean.features.conv0.weight, weight.mean(1, keepdim=True))
    tiled = load_pretrained(DenseNet(**SMALL, in_channels=4), tmp_path / "rgb.pth", in_channel_mode="repeat")
    expected = torch.cat([weight, weight[:, :1]], 1) * 3 / 4
    torch.testing.assert_close(tiled.features.conv0.weight, expected)
    with pytest.raises(CheckpointError, match="rgb.pth.*in_channel_mode='repeat'"):
        load_pretrained(DenseNet(**SMALL, in_channels=4), tmp_path / "rgb.pth")
    with pytest.raises(ConfigError, match="in_channel_mode"):
        load_pretrained(DenseNet(**SMALL), tmp_path / "rgb.pth", in_channel_mode="average")


def test_class_count_mismatch_reinitialises_classifier(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "seven.pth")
    model = DenseNet(**{**SMALL, "num_classes": 3})
    with torch.no_grad():
        model.classifier.bias.fill_(5.0)
    load_pretrained(model, tmp_path / "seven.pth")
    assert torch.equal(model.features.norm5.running_mean, source.features.norm5.running_mean)
    assert model.classifier.weight.shape == (3, source.classifier.in_features)
    assert torch.equal(model.classifier.bias, torch.zeros(3))  # re-initialised, not left as it was
    with pytest.raises(CheckpointError, match="seven.pth: classifier has 7 classes but the model has 3"):
        load_pretrained(
            DenseNet(**{**SMALL, "num_classes": 3}), tmp_path / "seven.pth", strict_classifier=True
        )


def test_encoder_without_classifier_ignores_classifier_keys(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "src.pth")
    model = load_pretrained(DenseNet(**{**SMALL, "num_classes": 0}), tmp_path / "src.pth")
    assert torch.equal(model.features.conv0.weight, source.features.conv0.weight)


def test_other_architecture_lists_keys_on_one_line(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(DenseNet(**SMALL), tmp_path / "resnet18.pth")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "resnet18.pth") in message
    assert re.search(r"\d+ missing keys \(features\.conv0\.weight, .*more\)", message)
    assert re.search(r"\d+ unexpected keys \(conv1\.weight, .*more\)", message)


def test_other_densenet_width_reports_shape_mismatches(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "k4.pth")
    with pytest.raises(CheckpointError, match="k4.pth: .*shape-mismatched"):
        load_pretrained(DenseNet(**{**SMALL, "growth_rate": 6}), tmp_path / "k4.pth")


class _Exploit:
    """Pickles to a call of ``open(path, "w")``: unpickling it would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    created = tmp_path / "pwned.txt"
    torch.save({"state_dict": {"features.conv0.weight": _Exploit(created)}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt: .*non-tensor objects.*weights_only"):
        load_pretrained(DenseNet(**SMALL), tmp_path / "evil.ckpt")
    assert not created.exists()


def test_files_that_are_not_checkpoints(tmp_path, source):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    torch.save(source.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    torch.save({"lr": 0.1}, tmp_path / "config.pth")
    for name in ["notes.pth", "cut.pth", "cut.safetensors", "config.pth", "absent.pth"]:
        with pytest.raises(CheckpointError, match=re.escape(name)) as info:
            load_pretrained(DenseNet(**SMALL), tmp_path / name)
        assert "\n" not in str(info.value)


def test_imagenet_by_name_reads_torchvisions_file_from_torch_home(tmp_path, monkeypatch):
    from seg_densenet.models import build_model
    from seg_densenet.models.weights import IMAGENET_FILES

    torch.manual_seed(0)
    state = torchvision.models.densenet121(weights=None).state_dict()
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / IMAGENET_FILES["densenet121"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    stem = state["features.conv0.weight"].sum(1, keepdim=True)  # RGB filters summed for grey images

    classifier = build_model("densenet121", in_channels=1, num_classes=4, weights="imagenet")
    unet = build_model("dense_unet", in_channels=1, num_classes=4, encoder_weights="imagenet")
    smp = build_model("smp_unet", in_channels=1, num_classes=4, encoder_weights="imagenet")
    for conv0 in (classifier.features.conv0, unet.encoder.features.conv0, smp.encoder.features.conv0):
        assert torch.equal(conv0.weight, stem)
    key = "features.denseblock3.denselayer7.conv2.weight"
    assert torch.equal(classifier.state_dict()[key], state[key]) and torch.equal(
        unet.encoder.state_dict()[key], state[key]
    )


def test_imagenet_by_name_without_the_file_says_where_and_how(tmp_path):
    from tests.conftest import run_cli

    result = run_cli(
        [
            "-m",
            "seg_densenet.train",
            "experiment=synthetic_quick",
            "task=segment",
            "model=dense_unet",
            "model.encoder_weights=imagenet",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        env={"TORCH_HOME": str(tmp_path / "empty")},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    expected = f"{tmp_path / 'empty' / 'hub' / 'checkpoints' / 'densenet121-a639ec97.pth'} not found"
    assert expected in lines[0] and "torchvision.models.densenet121(weights='IMAGENET1K_V1')" in lines[0], (
        lines[0]
    )
