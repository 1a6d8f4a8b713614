"""Ensembles of checkpoints (``ckpt=[a, b]``): the softmax of the members averaged, members checked."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from seg_densenet.errors import CheckpointError
from seg_densenet.inference.ensemble import Ensemble
from seg_densenet.inference.predictor import build_predictor
from seg_densenet.predict import predict_tree
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def second_ckpt(trained_ckpt, tmp_path_factory):
    """``trained_ckpt`` with every weight moved by noise: a second member that predicts otherwise."""
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in ckpt["state_dict"].items():
        if value.is_floating_point() and key.endswith("weight"):
            value.add_(0.3 * value.std().nan_to_num() * torch.randn(value.shape, generator=generator))
    path = tmp_path_factory.mktemp("second") / "second.ckpt"
    torch.save(ckpt, path)
    return path


def _saved(out, name):
    return np.asarray(nib.load(out / name).dataobj)


def test_ensemble_probabilities_are_the_mean_of_its_members(
    trained_ckpt, second_ckpt, synthetic_root, tmp_path
):
    image = synthetic_root / "patient002" / "patient002_frame01.nii.gz"
    probs = {}
    for name, ckpt in (("a", trained_ckpt), ("b", second_ckpt), ("ab", [trained_ckpt, second_ckpt])):
        predict_tree(ckpt, image, tmp_path / name, tta=False, postprocess=None, save_probs=True, device="cpu")
        probs[name] = _saved(tmp_path / name, "patient002_frame01_probs.nii.gz")
    assert np.abs(probs["a"] - probs["b"]).max() > 0.05  # the members differ
    np.testing.assert_allclose(probs["ab"], (probs["a"] + probs["b"]) / 2, atol=1e-5)
    labels = _saved(tmp_path / "ab", "patient002_frame01_pred.nii.gz")
    np.testing.assert_array_equal(labels, probs["ab"].argmax(-1))


def test_an_ensemble_of_one_network_predicts_what_the_network_predicts(trained_ckpt):
    model, _ = build_predictor(trained_ckpt, device="cpu")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        single = model.model(x).softmax(1)
        doubled = Ensemble([model.model, model.model]).eval()(x).softmax(1)
    torch.testing.assert_close(doubled, single, atol=1e-6, rtol=1e-5)


def test_members_with_other_preprocessing_or_labels_are_refused(trained_ckpt, tmp_path):
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    other = dict(ckpt, seg_densenet={**ckpt["seg_densenet"]})
    data = dict(other["seg_densenet"]["data"])
    settings = dict(data.get("preprocessing", data), normalization="minmax")
    other["seg_densenet"]["data"] = (
        {**data, "preprocessing": settings} if "preprocessing" in data else settings
    )
    path = tmp_path / "minmax.ckpt"
    torch.save(other, path)
    with pytest.raises(
        CheckpointError, match=rf"{path}: cannot be averaged with {trained_ckpt}: its preprocessing"
    ):
        build_predictor([trained_ckpt, path], device="cpu")
    record = ckpt["seg_densenet"]
    relabelled = dict(
        ckpt, seg_densenet={**record, "data": {**record["data"], "structures": ["LV", "MYO", "RV"]}}
    )
    path = tmp_path / "relabelled.ckpt"
    torch.save(relabelled, path)
    with pytest.raises(CheckpointError, match="its label set differs"):
        build_predictor([trained_ckpt, path], device="cpu")


def test_predict_cli_takes_a_list_of_checkpoints(trained_ckpt, second_ckpt, synthetic_root, tmp_path):
    image = synthetic_root / "patient001" / "patient001_frame01.nii.gz"
    result = run_cli(
        [
            "-m",
            "seg_densenet.predict",
            f"ckpt=[{trained_ckpt},{second_ckpt}]",
            f"input={image}",
            f"output={tmp_path / 'pred'}",
            "tta=d4",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "pred" / "patient001_frame01_pred.nii.gz").is_file()
