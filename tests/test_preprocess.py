"""Preprocessing: normalisation, resampling, crop/pad, the inverse, and the on-disk cache."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from test_acdc import toy_labels, write_case

from seg_densenet.data.acdc import discover_cases
from seg_densenet.data.cache import VolumeCache
from seg_densenet.data.nifti import Volume
from seg_densenet.data.preprocess import Preprocessor, center_shift, normalize_intensity, place
from seg_densenet.errors import ConfigError


def make_volume(data: np.ndarray, spacing=(1.5, 1.5, 8.0)) -> Volume:
    img = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    img.header.set_zooms(spacing)
    return Volume(data=data, affine=img.affine, header=img.header)


def test_zscore_after_percentile_clipping():
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (30, 30, 4)).astype(np.float32)
    data[0, 0, 0] = 1e6  # one hot pixel must not dominate the scale
    out = normalize_intensity(data, "zscore", (0.5, 99.5))
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-4
    assert out.max() < 4
    minmax = normalize_intensity(data, "minmax", (0.5, 99.5))
    assert minmax.min() == 0 and minmax.max() == 1
    np.testing.assert_array_equal(normalize_intensity(data, "none", None), data)
    assert np.all(normalize_intensity(np.full((4, 4, 2), 7.0), "zscore", (1, 99)) == 0)  # constant: no NaN


def test_bad_settings_raise_config_error():
    for kwargs in (
        {"normalization": "std"},
        {"percentiles": (99, 1)},
        {"target_spacing": (0, 1)},
        {"crop_size": (8,)},
    ):
        with pytest.raises(ConfigError):
            Preprocessor(**kwargs)


@pytest.mark.parametrize("crop_size", [None, (32, 44), (64, 56), (24, 64)])
def test_forward_shapes_and_label_round_trip_without_resampling(crop_size):
    labels = toy_labels((40, 48, 5))
    vol = make_volume(labels.astype(np.float32) * 50)
    pre = Preprocessor(crop_size=crop_size)
    image, meta = pre.forward(vol)
    expected_hw = crop_size or (40, 48)
    assert image.shape == (5, *expected_hw) and image.dtype == np.float32
    assert meta.spacing == (1.5, 1.5, 8.0)
    mask = pre.forward_label(labels, meta)
    assert mask.shape == (5, *expected_hw) and mask.dtype == np.int64
    # slices-first layout: image slice z is the volume's [:, :, z] (after the crop)
    np.testing.assert_array_equal(mask[2], place(labels[:, :, 2], expected_hw, meta.shift))
    # a prediction equal to the preprocessed labels maps back to the original labels exactly
    # (the toy heart lies inside every crop tested here)
    np.testing.assert_array_equal(pre.invert(mask, meta), labels)


def test_invert_of_a_cutting_crop_is_background_outside():
    labels = toy_labels((40, 48, 5))
    pre = Preprocessor(crop_size=(16, 16))
    _, meta = pre.forward(make_volume(labels.astype(np.float32)))
    back = pre.invert(pre.forward_label(labels, meta), meta)
    inside = (slice(12, 28), slice(16, 32))
    np.testing.assert_array_equal(back[inside], labels[inside])
    outside = np.ones(labels.shape, bool)
    outside[inside] = False
    assert not back[outside].any() and labels[outside].any()


def test_round_trip_with_resampling_is_near_exact():
    labels = toy_labels((60, 72, 4), radius=12)
    vol = make_volume(labels.astype(np.float32), spacing=(1.25, 1.25, 10.0))
    pre = Preprocessor(target_spacing=(1.6, 1.5), crop_size=(64, 64))
    image, meta = pre.forward(vol)
    assert meta.resampled_shape == (47, 60, 4)  # 60 * 1.25 / 1.6 = 46.9 -> 47, 72 * 1.25 / 1.5 = 60
    assert meta.spacing == pytest.approx((60 * 1.25 / 47, 1.5, 10.0))
    assert image.shape == (4, 64, 64)
    back = pre.invert(pre.forward_label(labels, meta), meta)
    assert back.shape == labels.shape
    for c in (1, 2, 3):
        a, b = labels == c, back == c
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.9, (c, dice)  # nearest-neighbour twice blurs the 3-pixel myocardium a little
        # and nothing moves: centres of mass agree to a fraction of a pixel
        np.testing.assert_allclose(ndimage.center_of_mass(b), ndimage.center_of_mass(a), atol=0.3)


def test_invert_probabilities():
    labels = toy_labels((40, 48, 3))
    vol = make_volume(labels.astype(np.float32))
    pre = Preprocessor(target_spacing=(1.0, 1.0), crop_size=(80, 80))
    _, meta = pre.forward(vol)
    mask = pre.forward_label(labels, meta)
    probs = np.eye(4, dtype=np.float32)[mask].transpose(0, 3, 1, 2)  # (S, C, H, W) one-hot
    back = pre.invert(probs, meta)
    assert back.shape == (4, 40, 48, 3)
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)
    assert (back.argmax(0) == labels).mean() > 0.97
    with pytest.raises(ValueError, match="does not match"):
        pre.invert(np.zeros((3, 10, 10)), meta)


def test_center_shift_crop_around_a_center_stays_inside():
    assert center_shift((100, 100), (50, 50)) == (-25, -25)
    assert center_shift((100, 100), (50, 50), center=(90, 5)) == (-50, 0)  # clamped to the array
    assert center_shift((30, 100), (50, 50), center=(0, 60)) == (10, -35)  # pad one axis, crop the other


# -- cache -----------------------------------------------------------------------------------------


def test_cache_second_access_reads_no_nifti(tmp_path, monkeypatch):
    write_case(tmp_path / "data", "patient001")
    frame = discover_cases(tmp_path / "data")[0].frames["ED"]
    cache = VolumeCache(tmp_path / "cache", Preprocessor(target_spacing=(2.0, 2.0)))
    first = cache.get(frame)
    assert (cache.hits, cache.misses) == (0, 1)
    image, mask = first.load()
    assert image.shape == mask.shape == (5, 30, 36) and mask.dtype == np.uint8
    assert first.label_center is not None and first.meta.spacing == (2.0, 2.0, 8.0)

    def no_nifti(*args, **kwargs):
        raise AssertionError("nibabel.load called on a cache hit")

    monkeypatch.setattr(nib, "load", no_nifti)
    second = VolumeCache(tmp_path / "cache", Preprocessor(target_spacing=(2.0, 2.0))).get(frame)
    assert second == first
    np.testing.assert_array_equal(second.load()[0], image)
    monkeypatch.undo()

    # a different setting or an edited source file is a new entry, never a stale one
    other = VolumeCache(tmp_path / "cache", Preprocessor(target_spacing=(1.5, 1.5)))
    assert other.get(frame).image_path != first.image_path and other.misses == 1
    write_case(tmp_path / "data", "patient001", seed=5)
    assert cache.get(frame).image_path != first.image_path and cache.misses == 2
    # entries are complete files only: no temporary leftovers
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
