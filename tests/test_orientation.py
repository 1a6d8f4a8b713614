"""Scans stored with the slice axis first or second: found from the header, predicted slices-last,
and written back in the input's own axis order and geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from seg_densenet.checkpoint import load_model
from seg_densenet.data.nifti import load_volume
from seg_densenet.predict import Predictor, permute_axes, predict_tree, preprocessor_from_record, slice_axis


def _saved(path, data: np.ndarray, affine: np.ndarray):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.mark.parametrize(
    "shape, zooms, expected",
    [
        ((96, 96, 10), (1.5, 1.5, 8.0), 2),
        ((10, 96, 96), (8.0, 1.5, 1.5), 0),
        ((96, 10, 96), (1.5, 8.0, 1.5), 1),
        ((20, 96, 96), (1.5, 1.5, 8.0), 2),  # the spacing decides before the shape
        ((216, 256, 10), (1.0, 1.0, 1.0), 2),  # a header that says 1 mm everywhere: the shortest axis
        ((10, 216, 256), (1.0, 1.0, 1.0), 0),
        ((256, 10, 216), (1.0, 1.0, 1.0), 1),
        ((100, 100, 12), (1.25, 1.25, 1.8), 2),  # 1.44x: not clearly a slice gap; the shape decides
        ((12, 100, 100), (1.8, 1.25, 1.25), 0),
        ((40, 48, 44), (1.0, 1.1, 1.2), 2),  # nothing stands out: the (X, Y, Z) convention
        ((30, 40, 50), (1.0, 1.0, 1.0), 2),
    ],
)
def test_slice_axis_from_spacing_then_shape(tmp_path, shape, zooms, expected):
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # oblique-free but not diagonal
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(zooms)
    volume = load_volume(_saved(tmp_path / "v.nii.gz", np.zeros(shape, np.float32), affine))
    assert slice_axis(volume) == expected


def test_permute_axes_keeps_the_world_geometry(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    affine = np.array([[0.0, 1.2, 0.0, -5.0], [-1.4, 0.0, 0.0, 3.0], [0.0, 0.0, 7.0, 9.0], [0, 0, 0, 1]])
    volume = load_volume(_saved(tmp_path / "v.nii.gz", data, affine))
    moved = permute_axes(volume, (2, 0, 1))
    assert moved.shape == (3, 4, 5) and moved.spacing == pytest.approx((7.0, 1.4, 1.2))
    assert moved.header.get_data_shape() == (3, 4, 5)
    for index in [(0, 0, 0), (1, 3, 4), (2, 1, 2)]:  # a voxel keeps its value and its world position
        old = (index[1], index[2], index[0])
        assert moved.data[index] == volume.data[old]
        np.testing.assert_allclose(moved.affine @ (*index, 1), volume.affine @ (*old, 1))


@pytest.fixture(scope="module")
def predictor(trained_ckpt):
    model, record = load_model(trained_ckpt)
    return Predictor(model, preprocessor_from_record(record["data"]), keep_probs=True, mc_samples=2)


@pytest.mark.parametrize("order", [(2, 0, 1), (0, 2, 1)])
@pytest.mark.parametrize("header", ["spacing", "isotropic"])
def test_permuted_scan_gives_the_permuted_prediction(predictor, synthetic_root, tmp_path, order, header):
    """(X, Y, Z) stored as (Z, X, Y) or (X, Z, Y), affine permuted alike: the same segmentation, permuted.
    "isotropic": a header that says 1 mm on every axis, so the shortest axis is taken for the slices."""
    src = nib.load(synthetic_root / "patient001" / "patient001_frame01.nii.gz")
    data = np.asarray(src.dataobj, dtype=np.float32)
    affine = src.affine.copy() if header == "spacing" else np.diag([1.0, 1.0, 1.0, 1.0])
    moved_affine = affine.copy()
    moved_affine[:, :3] = affine[:, list(order)]
    original = load_volume(_saved(tmp_path / "xyz.nii.gz", data, affine))
    moved = load_volume(_saved(tmp_path / "moved.nii.gz", data.transpose(order), moved_affine))
    assert slice_axis(original) == 2 and slice_axis(moved) == order.index(2)
    torch.manual_seed(0)  # the same MC-dropout masks for both
    expected = predictor.predict(original)
    torch.manual_seed(0)
    got = predictor.predict(moved)
    assert got["labels"].shape == moved.shape and got["probs"].shape == (4, *moved.shape)
    np.testing.assert_array_equal(got["labels"], expected["labels"].transpose(order))
    np.testing.assert_allclose(
        got["probs"], expected["probs"].transpose(0, *(a + 1 for a in order)), atol=1e-5
    )
    np.testing.assert_allclose(got["entropy"], expected["entropy"].transpose(order), atol=1e-5)
    assert len(np.unique(expected["labels"])) > 1  # a prediction worth comparing


def test_predict_cli_writes_a_slices_first_scan_in_its_own_geometry(trained_ckpt, synthetic_root, tmp_path):
    src = nib.load(synthetic_root / "patient002" / "patient002_frame01.nii.gz")
    data = np.asarray(src.dataobj, dtype=np.float32)
    moved_affine = src.affine.copy()
    moved_affine[:, :3] = src.affine[:, [2, 0, 1]]
    (tmp_path / "in").mkdir()
    _saved(tmp_path / "in" / "xyz.nii.gz", data, src.affine)
    _saved(tmp_path / "in" / "zxy.nii.gz", data.transpose(2, 0, 1), moved_affine)
    predict_tree(trained_ckpt, tmp_path / "in", tmp_path / "out", device="cpu")
    xyz, zxy = (nib.load(tmp_path / "out" / f"{name}_pred.nii.gz") for name in ("xyz", "zxy"))
    assert zxy.shape == data.transpose(2, 0, 1).shape
    np.testing.assert_allclose(zxy.affine, moved_affine, atol=1e-6)
    np.testing.assert_allclose(
        zxy.header.get_zooms(), np.asarray(src.header.get_zooms())[[2, 0, 1]], atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(zxy.dataobj), np.asarray(xyz.dataobj).transpose(2, 0, 1))
