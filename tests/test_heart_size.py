"""Heart size in grid pixels, the training sizes a checkpoint keeps, and the predictor's auto_scale."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from seg_densenet.data.heart_size import heart_size, size_at, size_percentiles, zoom_into_band


def _disc_slices(radii, shape=(96, 96)) -> np.ndarray:
    """Label maps ``(S, H, W)``: slice i holds a disc of radius ``radii[i]`` (0: empty), labelled 3."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2
    return np.stack([np.where(r2 < r**2, 3, 0) for r in radii]).astype(np.uint8)


def test_heart_size_is_the_root_of_the_75th_percentile_slice_area():
    mask = _disc_slices([0, 5, 10, 20, 20, 30])  # an empty slice does not count
    areas = (mask > 0).reshape(6, -1).sum(1)[1:]
    assert heart_size(mask) == pytest.approx(np.sqrt(np.percentile(areas, 75)))
    assert heart_size(mask) == pytest.approx(np.sqrt(np.pi) * 20, rel=0.02)
    # the few small apical slices and the slice count hardly move it
    assert heart_size(_disc_slices([20] * 8 + [4, 8])) == pytest.approx(heart_size(_disc_slices([20] * 3)))
    assert heart_size(_disc_slices([0, 0])) is None


def test_size_percentiles_and_the_zoom_into_their_band():
    stats = size_percentiles(_disc_slices([r] * 3) for r in range(10, 31))  # 21 hearts, 17.7 to 53.2 px
    assert stats["percentiles"] == list(range(0, 101, 5)) and stats["n_volumes"] == 21
    assert stats["pixels"] == sorted(stats["pixels"])
    low, high = size_at(stats, 5), size_at(stats, 95)
    assert low == pytest.approx(np.sqrt(np.pi) * 11, rel=0.03) and high == pytest.approx(
        np.sqrt(np.pi) * 29, rel=0.03
    )
    limits = (0.5, 2.0)
    assert zoom_into_band((low + high) / 2, stats, (5, 95), limits) == 1.0  # inside the band: unchanged
    assert zoom_into_band(1.4 * high, stats, (5, 95), limits) == pytest.approx(1 / 1.4)  # to the nearer edge
    assert zoom_into_band(low / 1.3, stats, (5, 95), limits) == pytest.approx(1.3)
    assert zoom_into_band(high, stats, (50, 50), limits) == pytest.approx(size_at(stats, 50) / high)
    assert zoom_into_band(low / 5, stats, (5, 95), limits) == 2.0  # within the limits
    assert zoom_into_band(None, stats, (5, 95), limits) == 1.0  # no heart found: unchanged
    assert size_percentiles([_disc_slices([0])]) is None


class _BrightIsLV(torch.nn.Module):
    """A 1x1 convolution: LV (class 3) wherever the normalised intensity is above 0, else background."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 0.0, 0.0, 8.0]).view(4, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -50.0, -50.0, 0.0]))

    def forward(self, x):
        return self.conv(x)


def test_auto_scale_zooms_a_heart_outside_the_training_band_and_only_then(tmp_path, caplog):
    """A heart 1.4x larger than every training heart is predicted exactly as with ``scales`` times 1/1.4
    (it is brought to the band's upper edge); one inside the band is predicted as without auto_scale."""
    from seg_densenet.data.nifti import load_volume
    from seg_densenet.data.preprocess import Preprocessor
    from seg_densenet.predict import Predictor

    stats = size_percentiles(_disc_slices([r] * 3) for r in range(10, 21))  # training hearts: 17.7 to 35.4 px
    big = 1.4 * size_at(stats, 95) / np.sqrt(np.pi)  # radius of a disc 1.4x the band's top
    for radius, zoom in ((big, 1 / 1.4), (15, 1.0)):
        image = _disc_slices([radius] * 4, shape=(112, 120)).astype(np.float32).transpose(1, 2, 0) * 100
        path = tmp_path / f"disc{radius:.0f}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.diag([1.0, 1.0, 8.0, 1.0])), path)
        volume = load_volume(path)
        auto = Predictor(
            _BrightIsLV(),
            Preprocessor(),
            keep_probs=True,
            scales=[1.0, 1.25],
            auto_scale=[5, 95],
            heart_size=stats,
        )
        expected_zoom = zoom_into_band(heart_size(_disc_slices([radius])), stats, (5, 95), (0.5, 2.0))
        assert expected_zoom == pytest.approx(zoom, rel=0.02)
        with caplog.at_level(logging.INFO, logger="seg_densenet.predict"):
            got = auto.predict(volume)
        reference = Predictor(
            _BrightIsLV(), Preprocessor(), keep_probs=True, scales=[expected_zoom, 1.25 * expected_zoom]
        )
        np.testing.assert_allclose(got["probs"], reference.predict(volume)["probs"], atol=1e-6)
        assert ("zoomed by 0.71" in caplog.text) == (zoom != 1.0)
        # a scale-equivariant net segments the disc either way
        truth = image > 0
        dice = 2 * (truth & (got["labels"] == 3)).sum() / (truth.sum() + (got["labels"] == 3).sum())
        assert dice > 0.97, dice  # edges blur a pixel at 0.71x
        caplog.clear()


class _Counting(_BrightIsLV):
    """:class:`_BrightIsLV` that counts the slices it is given."""

    slices = 0

    def forward(self, x):
        self.slices += x.shape[0]
        return super().forward(x)


def test_a_plain_prediction_reuses_auto_scales_first_pass(tmp_path):
    """Without TTA and at one scale, a heart inside the band is predicted by auto_scale's own first pass
    (each slice through the network once, the result as without auto_scale); one outside it twice."""
    from seg_densenet.data.nifti import load_volume
    from seg_densenet.data.preprocess import Preprocessor
    from seg_densenet.predict import Predictor

    stats = size_percentiles(_disc_slices([r] * 3) for r in range(10, 21))
    for radius, passes in ((15, 1), (30, 2)):
        image = _disc_slices([radius] * 4, shape=(96, 96)).astype(np.float32).transpose(1, 2, 0) * 100
        path = tmp_path / f"disc{radius}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), path)
        volume = load_volume(path)
        net = _Counting()
        got = Predictor(net, Preprocessor(), keep_probs=True, auto_scale=[5, 95], heart_size=stats).predict(
            volume
        )
        assert net.slices == passes * 4
        if passes == 1:
            plain = Predictor(_BrightIsLV(), Preprocessor(), keep_probs=True).predict(volume)
            np.testing.assert_array_equal(got["labels"], plain["labels"])
            np.testing.assert_allclose(got["probs"], plain["probs"], atol=1e-6)


def test_auto_scale_is_off_for_a_checkpoint_without_training_sizes(caplog):
    from seg_densenet.data.preprocess import Preprocessor
    from seg_densenet.errors import ConfigError
    from seg_densenet.predict import Predictor

    with caplog.at_level(logging.WARNING, logger="seg_densenet.predict"):
        predictor = Predictor(_BrightIsLV(), Preprocessor(), auto_scale=[5, 95], heart_size=None)
    assert predictor.auto_scale is None and "records no training heart sizes" in caplog.text
    with pytest.raises(ConfigError, match="auto_scale=\\[95, 5\\]"):
        Predictor(
            _BrightIsLV(),
            Preprocessor(),
            auto_scale=[95, 5],
            heart_size={"percentiles": [0, 100], "pixels": [1, 2]},
        )


def test_a_trained_checkpoint_records_its_training_heart_sizes(trained_ckpt):
    from seg_densenet.checkpoint import safe_torch_load
    from seg_densenet.predict import build_predictor

    record = safe_torch_load(trained_ckpt)["seg_densenet"]
    stats = record["heart_size"]
    assert stats["percentiles"] == list(range(0, 101, 5)) and stats["n_volumes"] >= 2
    assert (
        stats["pixels"] == sorted(stats["pixels"]) and stats["pixels"][0] > 5
    )  # phantom hearts, grid pixels
    predictor, _ = build_predictor(trained_ckpt, device="cpu", auto_scale=[5, 95])
    assert predictor.heart_size == stats and predictor.auto_scale == (5.0, 95.0)
