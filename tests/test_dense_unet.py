"""DenseUNet (DenseNet encoder + dense-block decoder) and the smp U-Net baseline: shapes, weights, modes."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torchvision

from seg_densenet.errors import CheckpointError, ConfigError
from seg_densenet.lit.losses import DiceCELoss, deep_supervision_loss
from seg_densenet.models import DenseUNet, build_densenet, smp_unet
from seg_densenet.models.unet_decoder import UNetDecoder

SMALL = {"growth_rate": 4, "block_config": [1, 2, 2, 1], "num_init_features": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread than on two, and stay fast on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(**kw) -> DenseUNet:
    args = dict(encoder_params=SMALL, decoder_layers=(2, 2, 1, 1, 1), decoder_growth_rate=4)
    return DenseUNet(**{**args, **kw})


@pytest.mark.parametrize(
    "in_channels, num_classes, size, upsample",
    [
        (1, 2, (64, 64), "transposed"),
        (1, 4, (97, 131), "transposed"),
        (1, 4, (97, 131), "bilinear"),
        (3, 2, (45, 38), "bilinear"),
        (3, 4, (33, 63), "transposed"),
    ],
)
def test_forward_backward_grid(in_channels, num_classes, size, upsample):
    torch.manual_seed(0)
    model = small(in_channels=in_channels, num_classes=num_classes, upsample=upsample, drop_rate=0.1)
    x = torch.randn(2, in_channels, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, num_classes, *size)
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_named_encoder_architecture_equals_encoder_params():
    torch.manual_seed(0)
    named = DenseUNet(**SMALL, decoder_layers=(1, 1, 1, 1, 0), decoder_growth_rate=4)
    torch.manual_seed(0)
    params = DenseUNet(encoder_params=SMALL, decoder_layers=(1, 1, 1, 1, 0), decoder_growth_rate=4)
    assert named.encoder.feature_channels == params.encoder.feature_channels
    for (ka, va), (kb, vb) in zip(named.state_dict().items(), params.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # the named arguments win over encoder_params
    wider = DenseUNet(
        growth_rate=6, encoder_params=SMALL, decoder_layers=(1, 1, 1, 1, 0), decoder_growth_rate=4
    )
    assert wider.encoder.feature_channels[1] == 8 + 6


def test_input_skip_feeds_the_image_to_the_full_resolution_stage():
    torch.manual_seed(0)
    plain = small()
    skip = small(input_skip=True)
    assert (
        skip.decoder.blocks[-1].layers[0].norm.num_features
        == plain.decoder.blocks[-1].layers[0].norm.num_features + 1
    )
    x = torch.randn(2, 1, 45, 38, requires_grad=True)
    out = skip(x)
    assert out.shape == (2, 4, 45, 38)
    # the last stage's first layer sees the raw image: its weights for that channel get a gradient
    out.square().mean().backward()
    conv = skip.decoder.blocks[-1].layers[0].conv
    assert conv.weight.grad[:, -1].abs().sum() > 0
    with pytest.raises(ValueError, match="pass image="):
        skip.decoder(skip.encoder(x), x.shape[-2:])


def test_encoder_taps_and_decoder_plan_of_densenet121():
    model = DenseUNet("densenet121", in_channels=1, num_classes=4)
    assert model.encoder.feature_channels == [64, 256, 512, 1024, 1024]
    assert model.encoder.feature_strides == [2, 4, 8, 16, 32]
    assert "classifier.weight" not in model.encoder.state_dict()
    # Default decoder (4, 4, 2, 2, 0), k=16: stages pass on only their new maps, so after compressing the
    # 1024-map bottleneck each up conv sees the previous stage's layers * 16 maps.
    assert [up.conv.in_channels for up in model.decoder.ups] == [1024, 64, 64, 32, 32]
    assert [up.conv.out_channels for up in model.decoder.ups] == [64, 64, 32, 32, 16]
    assert model.decoder.out_channels == model.head.conv.in_channels == 16
    with torch.no_grad():
        feats = model.eval().encoder(torch.randn(1, 1, 97, 131))
    assert [tuple(f.shape[-2:]) for f in feats] == [(49, 66), (25, 33), (12, 16), (6, 8), (3, 4)]


def test_encoder_loads_a_torchvision_densenet121_file(tmp_path):
    reference = torchvision.models.densenet121(weights=None).state_dict()
    path = tmp_path / "densenet121.pth"
    torch.save(reference, path)
    model = DenseUNet("densenet121", in_channels=1, num_classes=4, encoder_weights=str(path))
    loaded = model.state_dict()
    features = [k for k in reference if k.startswith("features.")]
    assert len(features) == len([k for k in loaded if k.startswith("encoder.")])
    for key in features:
        expected = reference[key].sum(1, keepdim=True) if key == "features.conv0.weight" else reference[key]
        torch.testing.assert_close(loaded["encoder." + key], expected, rtol=0, atol=0, msg=key)


def test_encoder_loads_a_classification_checkpoint(tmp_path):
    classifier = build_densenet("densenet121", **SMALL, in_channels=1, num_classes=4)
    torch.nn.init.normal_(classifier.features.norm5.weight)  # not the init value, so loading shows
    path = tmp_path / "classify.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in classifier.state_dict().items()}}, path)
    model = small(encoder_weights=str(path))
    for key, value in classifier.features.state_dict().items():
        torch.testing.assert_close(model.encoder.features.state_dict()[key], value, rtol=0, atol=0)


def test_encoder_rejects_weights_of_another_architecture(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(build_densenet("densenet121", growth_rate=8, block_config=[1, 1, 1, 1]).state_dict(), path)
    with pytest.raises(CheckpointError, match="other.pth"):
        small(encoder_weights=str(path))


def test_smp_unet_loads_the_same_encoder_file(tmp_path):
    reference = torchvision.models.densenet121(weights=None).state_dict()
    path = tmp_path / "densenet121.pth"
    torch.save(reference, path)
    model = smp_unet(in_channels=1, num_classes=4, encoder_weights=str(path))
    loaded = model.encoder.state_dict()
    for key in (k for k in reference if k.startswith("features.")):
        expected = reference[key].sum(1, keepdim=True) if key == "features.conv0.weight" else reference[key]
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 4, 64, 64)


def test_unet_decoder_loads_smp_unet_decoder_weights_and_gives_its_output():
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

    torch.manual_seed(0)
    channels = [8, 12, 16, 20, 24]  # encoder taps at strides 2..32
    reference = UnetDecoder(encoder_channels=[1, *channels], decoder_channels=[20, 16, 12, 8, 4], n_blocks=5)
    ours = UNetDecoder(channels, decoder_channels=[20, 16, 12, 8, 4])
    ours.load_state_dict(reference.state_dict(), strict=True)  # same keys and shapes
    size = (70, 90)  # not a multiple of 32: the stages resize to each skip's exact size
    sizes = [size, (35, 45), (18, 23), (9, 12), (5, 6), (3, 3)]
    features = [torch.randn(2, c, *hw) for c, hw in zip([1, *channels], sizes)]
    for mode in (ours.train, ours.eval):
        mode(), reference.train(ours.training)
        torch.testing.assert_close(ours(features[1:], size), reference(features))


@pytest.mark.parametrize("input_skip, size", [(False, (64, 64)), (True, (97, 131))])
def test_dense_unet_takes_another_decoder_through_its_seam(input_skip, size):
    torch.manual_seed(0)
    model = small(decoder=partial(UNetDecoder, decoder_channels=[16, 12, 8, 8, 4]), input_skip=input_skip)
    assert isinstance(model.decoder, UNetDecoder) and model.decoder.input_skip == input_skip
    assert model.head.conv.in_channels == 4
    x = torch.randn(2, 1, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 4, *size)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ConfigError, match="decoder_channels needs 5 entries"):
        small(decoder=partial(UNetDecoder, decoder_channels=[16, 8]))


def test_deep_supervision_adds_auxiliary_logits_in_training_only():
    torch.manual_seed(0)
    model = small(deep_supervision=2)
    x = torch.randn(2, 1, 70, 90)  # not a multiple of 32: the auxiliary maps cover the input's pixels only
    outputs = model.train()(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 70, 90), (2, 4, 35, 45), (2, 4, 18, 23)]
    target = torch.randint(0, 4, (2, 70, 90))
    loss = deep_supervision_loss(DiceCELoss(), outputs, target)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # weights 1, 1/2, 1/4 normalised; with one output it is the plain loss
    parts = [
        DiceCELoss()(
            o, torch.nn.functional.interpolate(target[:, None].float(), size=o.shape[-2:])[:, 0].long()
        )
        for o in outputs
    ]
    torch.testing.assert_close(loss, (parts[0] + parts[1] / 2 + parts[2] / 4) / 1.75)
    torch.testing.assert_close(deep_supervision_loss(DiceCELoss(), outputs[:1], target), parts[0])
    # evaluation: the logits alone, the same as the model without auxiliary heads
    plain = small()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("aux_heads.")})
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
    with pytest.raises(ConfigError, match="deep_supervision must be 0..4"):
        small(deep_supervision=5)
    with pytest.raises(ConfigError, match="needs the dense decoder"):
        small(deep_supervision=1, decoder=partial(UNetDecoder, decoder_channels=[16, 12, 8, 8, 4]))


@pytest.mark.parametrize("mode", [True, "checkpoint"])
def test_memory_efficient_mode_gives_identical_outputs_and_gradients(mode):
    torch.manual_seed(0)
    plain = small(drop_rate=0.2)
    efficient = small(drop_rate=0.2, memory_efficient=mode)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 45, 50)
    results = []
    for model in (plain, efficient):
        torch.manual_seed(1)  # same dropout masks
        out = model(x)
        out.square().mean().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    (out_a, g_a), (out_b, g_b) = results
    torch.testing.assert_close(out_a, out_b)
    for ga, gb in zip(g_a, g_b):
        torch.testing.assert_close(ga, gb)
    torch.testing.assert_close(plain.state_dict(), efficient.state_dict())


def test_mc_dropout_keeps_decoder_dropout_active_in_eval_mode():
    x = torch.randn(1, 1, 32, 32)
    model = small(drop_rate=0.5).eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.enable_mc_dropout()
        assert not torch.equal(model(x), model(x))
    model = small(drop_rate=0.5, mc_dropout=True).eval()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("build", ["dense_unet", "smp_unet"])
def test_any_size_gets_the_alignment_of_multiple_of_32_inputs(build):
    # DenseNet's stem rounds odd sizes up and its transitions round down, so without padding the decoder
    # meets its skips one pixel off at odd sizes (on the phantom: whole-volume Dice 0.86 instead of 0.92
    # for the weights trained on 128x128 crops). Any size must predict what the padded size predicts.
    torch.manual_seed(0)
    model = (small() if build == "dense_unet" else smp_unet(in_channels=1, num_classes=4)).eval()
    x = torch.randn(2, 1, 97, 131)
    padded = torch.nn.functional.pad(x, (0, 160 - 131, 0, 128 - 97), mode="reflect")
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 4, 97, 131)
        torch.testing.assert_close(out, model(padded)[..., :97, :131])


def test_torch_export_matches_eager():
    torch.manual_seed(0)
    model = small(drop_rate=0.2).eval()
    x = torch.randn(1, 1, 97, 66)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"encoder": "resnet50"}, "unknown DenseUNet encoder 'resnet50'"),
        ({"upsample": "nearest"}, "unknown upsample 'nearest'"),
        ({"decoder_layers": (2, 2)}, "decoder_layers needs 5 entries"),
        ({"encoder_params": {**SMALL, "block_config": [1, 1, 1]}}, "needs 4 dense blocks"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        small(**kwargs)


def test_too_small_input_says_what_padding_to_use():
    with pytest.raises(ValueError, match="pad the image to 32x32"):
        small()(torch.randn(1, 1, 16, 64))
