"""Prediction to NIfTI with the input's geometry, and ONNX export, through the real CLIs."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from seg_densenet.config import REPO_ROOT
from tests.conftest import run_cli


def _predict(args: list[str]):
    return run_cli(["-m", "seg_densenet.predict", *args])


def test_predict_acdc_tree_mirrors_input_and_keeps_geometry(trained_ckpt, synthetic_root, tmp_path):
    out = tmp_path / "pred"
    result = _predict([f"ckpt={trained_ckpt}", f"input={synthetic_root}", f"output={out}", "batch_size=4"])
    assert result.returncode == 0, result.stderr[-2000:]
    images = sorted(p for p in synthetic_root.rglob("*.nii.gz") if not p.name.endswith("_gt.nii.gz"))
    assert images
    for image in images:
        rel = image.relative_to(synthetic_root)
        pred = out / rel.parent / image.name.replace(".nii.gz", "_pred.nii.gz")
        assert pred.is_file(), pred
        src, got = nib.load(image), nib.load(pred)
        assert got.shape == src.shape
        assert got.get_data_dtype() == np.uint8
        np.testing.assert_allclose(got.affine, src.affine, atol=1e-6)
        np.testing.assert_allclose(got.header.get_zooms(), src.header.get_zooms(), atol=1e-6)
        assert int(got.header["qform_code"]) == int(src.header["qform_code"])
        assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1, 2, 3}
    assert not list(out.rglob("*_gt_pred.nii.gz"))  # ground truth is not an input


def test_predict_options_tta_lcc_mc_dropout_probs(trained_ckpt, synthetic_root, tmp_path):
    image = next(synthetic_root.glob("patient001/patient001_frame01.nii.gz"))
    out = tmp_path / "pred"
    result = _predict(
        [
            f"ckpt={trained_ckpt}",
            f"input={image}",
            f"output={out}",
            "tta=d4",
            "postprocess=lcc",
            "mc_samples=3",
            "save_probs=true",
            "device=cpu",
            "precision=bf16",
            "scales=[1.0,0.8]",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    shape = nib.load(image).shape
    unc = nib.load(out / "patient001_frame01_uncertainty.nii.gz")
    probs = nib.load(out / "patient001_frame01_probs.nii.gz")
    assert unc.shape == shape and probs.shape == (*shape, 4)
    p = np.asarray(probs.dataobj)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-3)
    entropy = np.asarray(unc.dataobj)
    assert entropy.min() >= 0 and entropy.max() <= np.log(4) + 1e-4


def test_largest_connected_component_keeps_one_blob_per_structure():
    from seg_densenet.predict import largest_connected_components

    labels = np.zeros((20, 20, 5), np.uint8)
    labels[2:8, 2:8, 1:4] = 3
    labels[15:17, 15:17, 2] = 3  # a small island of LV
    labels[10:12, 2:6, 1:3] = 1
    out = largest_connected_components(labels)
    assert (out[15:17, 15:17, 2] == 0).all()
    assert (out[2:8, 2:8, 1:4] == 3).all() and (out[10:12, 2:6, 1:3] == 1).all()


def test_predict_and_evaluate_follow_symlinked_case_folders(trained_ckpt, synthetic_root, tmp_path):
    """A tree of links to case folders (e.g. one fold's test patients) is predicted and evaluated."""
    tree = tmp_path / "linked"
    tree.mkdir()
    cases = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[:2]
    for case in cases:
        (tree / case.name).symlink_to(case, target_is_directory=True)
    out = tmp_path / "pred"
    result = _predict([f"ckpt={trained_ckpt}", f"input={tree}", f"output={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    written = sorted(p.relative_to(out) for p in out.rglob("*_pred.nii.gz"))
    assert len(written) == 2 * len(cases) and {p.parts[0] for p in written} == {c.name for c in cases}
    assert all(not p.is_symlink() for p in out.iterdir())  # outputs are real folders, links untouched
    result = run_cli(
        [
            "-m",
            "seg_densenet.evaluate",
            f"pred={out}",
            f"gt={tree}",
            f"output={tmp_path / 'report'}",
            "plots=false",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "report" / "summary.json").is_file()


def test_predict_never_writes_over_its_input(trained_ckpt, synthetic_root, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    src = folder / "scan.nii.gz"
    shutil.copy(synthetic_root / "patient002" / "patient002_frame01.nii.gz", src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    result = _predict([f"ckpt={trained_ckpt}", f"input={folder}", f"output={folder}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert (folder / "scan_pred.nii.gz").is_file()
    # predicting the same folder again skips the earlier outputs and still leaves the input alone
    result = _predict([f"ckpt={trained_ckpt}", f"input={folder}", f"output={folder}"])
    assert result.returncode == 0
    assert sorted(p.name for p in folder.iterdir()) == ["scan.nii.gz", "scan_pred.nii.gz"]


def test_prediction_killed_midway_leaves_no_partial_mask(trained_ckpt, synthetic_root, tmp_path):
    out = tmp_path / "pred"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "seg_densenet.predict",
            f"ckpt={trained_ckpt}",
            f"input={synthetic_root}",
            f"output={out}",
            "batch_size=1",
            "mc_samples=3",
        ],  # three passes per slice: slow enough to kill
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(out.rglob("*_pred.nii.gz")):
        time.sleep(0.05)
    time.sleep(0.3)
    if proc.poll() is not None:
        pytest.fail("prediction finished before it could be killed; make it slower")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = list(out.rglob("*_pred.nii.gz"))
    assert written
    for path in written:
        np.asarray(nib.load(path).dataobj)  # every visible mask is complete and readable
    n_images = len([p for p in synthetic_root.rglob("*.nii.gz") if not p.name.endswith("_gt.nii.gz")])
    assert len(written) < n_images


def test_export_onnx_matches_pytorch(trained_ckpt, tmp_path):
    out = tmp_path / "model.onnx"
    result = run_cli(
        [
            "-m",
            "seg_densenet.export",
            f"ckpt={trained_ckpt}",
            "format=onnx",
            f"output={out}",
            "image_size=[96,112]",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and "max difference" in result.stdout
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    from seg_densenet.checkpoint import load_model

    model, _ = load_model(trained_ckpt)
    model.eval()
    for shape in [
        (1, 1, 96, 112),
        (5, 1, 96, 112),
        (2, 1, 133, 97),
        (1, 1, 216, 256),
    ]:  # dynamic batch and size
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        logits = session.run(None, {"image": x})[0]
        assert logits.shape == (shape[0], 4, *shape[2:])
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        assert np.abs(logits - expected).max() < 1e-4


def test_large_volume_is_predicted_within_a_memory_budget(trained_ckpt, tmp_path):
    from seg_densenet.checkpoint import load_model
    from seg_densenet.data.nifti import load_volume
    from seg_densenet.predict import Predictor, preprocessor_from_record

    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, size=(1024, 1024, 6)).astype(np.float32)
    path = tmp_path / "large.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 8.0, 1.0])), path)
    volume = load_volume(path)
    model, record = load_model(trained_ckpt)
    preprocessor = preprocessor_from_record(record["data"])
    unlimited = Predictor(model, preprocessor, batch_size=6)
    image, _ = preprocessor.forward(volume)
    height, width = image.shape[1:]
    assert unlimited.slices_within_budget(height, width) == 6
    per_slice = unlimited._measure_slice_bytes(height, width)
    assert per_slice >= height * width * 4 * 4  # at least the class probabilities
    # a budget of 2.5 measured slices: two slices per pass
    limited = Predictor(model, preprocessor, batch_size=6, memory_budget_mb=2.5 * per_slice / 2**20)
    batch = limited.slices_within_budget(height, width)
    assert batch == 2
    # a smaller image fits more slices into the same budget
    assert limited.slices_within_budget(height // 2, width // 2) >= batch
    result = limited.predict(volume)
    assert result["labels"].shape == volume.shape and result["labels"].dtype == np.uint8
    np.testing.assert_array_equal(result["labels"], unlimited.predict(volume)["labels"])


def test_channels_last_predicts_what_nchw_predicts(trained_ckpt, tmp_path):
    from seg_densenet.checkpoint import load_model
    from seg_densenet.data.nifti import load_volume
    from seg_densenet.predict import Predictor, preprocessor_from_record

    data = np.random.default_rng(1).normal(100, 20, size=(70, 90, 3)).astype(np.float32)
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 8.0, 1.0])), path)
    volume = load_volume(path)
    results = []
    for channels_last in (True, False):
        model, record = load_model(trained_ckpt)
        preprocessor = preprocessor_from_record(record["data"])
        predictor = Predictor(model, preprocessor, keep_probs=True, channels_last=channels_last)
        kernels = [
            p for p in predictor.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1
        ]
        assert all(k.is_contiguous(memory_format=torch.channels_last) == channels_last for k in kernels)
        results.append(predictor.predict(volume))
    np.testing.assert_allclose(results[0]["probs"], results[1]["probs"], atol=1e-5)
    np.testing.assert_array_equal(results[0]["labels"], results[1]["labels"])


# test-time augmentation: only the in-plane symmetries the training augmentation produced


def _compose(*transforms: dict) -> dict:
    return {"_target_": "albumentations.Compose", "_convert_": "all", "transforms": list(transforms)}


_AFFINE_15 = {"_target_": "albumentations.Affine", "rotate": [-15, 15], "scale": [0.9, 1.1], "p": 0.5}
_HFLIP = {"_target_": "albumentations.HorizontalFlip", "p": 0.5}
_VFLIP = {"_target_": "albumentations.VerticalFlip", "p": 0.5}


@pytest.mark.parametrize(
    "augmentation, expected",
    [
        (None, ["identity"]),
        (_compose(), ["identity"]),
        (_compose(_AFFINE_15), ["identity"]),  # the no-flip default (conf/augmentation/cardiac.yaml)
        (_compose(_AFFINE_15, _HFLIP, _VFLIP), ["identity", "hflip", "vflip", "rot180"]),
        (_compose(_HFLIP), ["identity", "hflip"]),
        (_compose(_HFLIP, {**_VFLIP, "p": 0.0}), ["identity", "hflip"]),
        (
            _compose({"_target_": "albumentations.Affine", "rotate": [-180, 180]}),
            ["identity", "rot180", "rot90", "rot270"],
        ),
        (
            _compose({"_target_": "albumentations.Affine", "rotate": [-90, 90]}),
            ["identity", "rot90", "rot270"],
        ),
        (
            _compose({"_target_": "albumentations.Affine", "rotate": [0, 100]}),
            ["identity", "rot90"],
        ),  # +90 is rot90's sense
        (
            _compose({"_target_": "albumentations.Rotate", "limit": 180}),
            ["identity", "rot180", "rot90", "rot270"],
        ),
        (_compose({"_target_": "albumentations.ShiftScaleRotate"}), ["identity"]),  # default ±45°
        (
            _compose({"_target_": "albumentations.Affine", "rotate": [-180, 180]}, _HFLIP),
            ["identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose"],
        ),
        (
            _compose({"_target_": "albumentations.RandomRotate90"}, _HFLIP),
            ["identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose"],
        ),
        (_compose({"_target_": "albumentations.Transpose"}), ["identity", "transpose"]),
        (
            _compose({"_target_": "albumentations.D4"}),
            ["identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose"],
        ),
        (
            _compose({"_target_": "albumentations.OneOf", "transforms": [_HFLIP, _VFLIP]}),
            ["identity", "hflip", "vflip"],
        ),
        ({**_compose(_HFLIP, _VFLIP), "p": 0.0}, ["identity"]),
    ],
)
def test_tta_transforms_are_those_the_training_augmentation_covers(augmentation, expected):
    from seg_densenet.predict import tta_transforms

    assert [g.name for g in tta_transforms(augmentation)] == expected


def test_tta_transforms_of_the_shipped_augmentation_configs():
    from omegaconf import OmegaConf

    from seg_densenet.predict import tta_transforms

    def names(option: str) -> list[str]:
        cfg = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "augmentation" / f"{option}.yaml"))
        return [g.name for g in tta_transforms(cfg)]

    assert names("cardiac") == ["identity"]
    assert names("cardiac_flips") == ["identity", "hflip", "vflip", "rot180"]


def test_tta_modes_bound_the_passes_and_say_when_there_is_one(caplog):
    from seg_densenet.errors import ConfigError
    from seg_densenet.predict import select_tta

    d4 = _compose({"_target_": "albumentations.Affine", "rotate": [-180, 180]}, _HFLIP, _VFLIP)
    assert [g.name for g in select_tta(True, d4)] == ["identity", "hflip", "vflip", "rot180"]
    assert len(select_tta("d4", d4)) == 8 and select_tta("true", d4) == select_tta(True, d4)
    assert [g.name for g in select_tta(False, d4)] == ["identity"]
    with caplog.at_level("INFO", logger="seg_densenet.predict"):
        assert [g.name for g in select_tta(True, _compose(_AFFINE_15))] == ["identity"]
    assert "no in-plane flips or rotations; tta=true is a single pass" in caplog.text
    with pytest.raises(ConfigError, match="false, true, d4"):
        select_tta("yes", d4)
    # an ensemble: the symmetries every member was trained with, said once
    flips = _compose(_HFLIP, _VFLIP)
    caplog.clear()
    with caplog.at_level("INFO", logger="seg_densenet.predict"):
        assert [g.name for g in select_tta("d4", d4, flips)] == ["identity", "hflip", "vflip", "rot180"]
    assert caplog.text.count("tta:") == 1
    assert select_tta("d4", d4, d4) == select_tta("d4", d4)


def test_every_tta_transform_inverts_exactly_and_composes_as_d4():
    from seg_densenet.predict import D4, FLIPS, HFLIP, ROT180, VFLIP

    x = torch.randn(2, 3, 5, 7)
    for g in D4:
        y = g.apply(x)
        assert y.shape[-2:] == ((5, 7) if g in FLIPS else (7, 5))
        assert torch.equal(g.invert(y), x), g.name
        for h in D4:
            assert torch.equal((g @ h).apply(x), g.apply(h.apply(x))), (g.name, h.name)
    assert torch.equal(HFLIP.apply(x), x.flip(-1)) and torch.equal(VFLIP.apply(x), x.flip(-2))
    assert torch.equal(ROT180.apply(x), x.flip(-2, -1))


class _SymmetricNet(torch.nn.Module):
    """Two 3x3 convolutions with D4-symmetric kernels: exactly equivariant to every in-plane symmetry
    (up to float summation order), so TTA must not change its labels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                w = conv.weight
                w.copy_(
                    sum(torch.rot90(v, k, (-2, -1)) for v in (w, w.transpose(-2, -1)) for k in range(4)) / 8
                )

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_tta_leaves_an_equivariant_model_unchanged(tmp_path):
    from seg_densenet.data.nifti import load_volume
    from seg_densenet.data.preprocess import Preprocessor
    from seg_densenet.predict import D4, Predictor

    data = np.random.default_rng(2).normal(100, 20, size=(40, 52, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 8.0, 1.0])), tmp_path / "scan.nii.gz")
    volume = load_volume(tmp_path / "scan.nii.gz")
    plain = Predictor(_SymmetricNet(), Preprocessor(), keep_probs=True).predict(volume)
    averaged = Predictor(_SymmetricNet(), Preprocessor(), keep_probs=True, tta_transforms=D4).predict(volume)
    np.testing.assert_allclose(averaged["probs"], plain["probs"], atol=1e-5)
    np.testing.assert_array_equal(averaged["labels"], plain["labels"])


def test_tta_averages_the_transformed_predictions_of_a_trained_model(trained_ckpt, tmp_path):
    """A TTA pass equals predicting the transformed volume and transforming the probabilities back, on
    a non-square slice through the real DenseUNet (quarter turns swap H and W)."""
    from seg_densenet.checkpoint import load_model
    from seg_densenet.data.nifti import Volume
    from seg_densenet.data.preprocess import Preprocessor
    from seg_densenet.predict import D4, HFLIP, IDENTITY, ROT90, Predictor

    data = np.random.default_rng(3).normal(100, 20, size=(36, 50, 2)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    model, _ = load_model(trained_ckpt)
    no_tta = Predictor(model, Preprocessor(), keep_probs=True)

    def probs_of(array: np.ndarray, predictor: Predictor) -> np.ndarray:
        return predictor.predict(Volume(array, affine, nib.Nifti1Image(array, affine).header))["probs"]

    def on_slices(g, array, invert=False):  # (..., X, Y, Z) as slices (Z, ..., X, Y)
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0)))
        return np.ascontiguousarray(np.moveaxis((g.invert(t) if invert else g.apply(t)).numpy(), 0, -1))

    for transforms in ([HFLIP], [ROT90], [IDENTITY, HFLIP, ROT90]):
        expected = np.mean(
            [on_slices(g, probs_of(on_slices(g, data), no_tta), invert=True) for g in transforms], 0
        )
        got = probs_of(data, Predictor(model, Preprocessor(), keep_probs=True, tta_transforms=transforms))
        np.testing.assert_allclose(got, expected, atol=1e-5)
    full = probs_of(data, Predictor(model, Preprocessor(), keep_probs=True, tta_transforms=D4))
    assert full.shape == (4, *data.shape)
    np.testing.assert_allclose(full.sum(0), 1.0, atol=1e-5)


def test_scales_average_the_zoomed_predictions_resized_back(trained_ckpt):
    """Multi-scale TTA: each scale's pass is the network on the bilinearly zoomed slices, its softmax
    resized back to the slice's grid; the scales' mean is the prediction."""
    import torch.nn.functional as F

    from seg_densenet.checkpoint import load_model
    from seg_densenet.data.preprocess import Preprocessor
    from seg_densenet.errors import ConfigError
    from seg_densenet.predict import Predictor

    model, _ = load_model(trained_ckpt)
    slices = torch.randn(2, 1, 36, 50, generator=torch.Generator().manual_seed(0))
    single = Predictor(model, Preprocessor())
    zoomed = F.interpolate(slices, size=(45, 62), mode="bilinear", align_corners=False)  # x1.25, rounded
    at_125 = F.interpolate(single._probabilities(zoomed), size=(36, 50), mode="bilinear", align_corners=False)
    expected = (single._probabilities(slices) + at_125) / 2
    got = Predictor(model, Preprocessor(), scales=[1.0, 1.25])._probabilities(slices)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - single._probabilities(slices)).abs().max() > 1e-3  # the second scale changed something
    torch.testing.assert_close(
        Predictor(model, Preprocessor(), scales=[1.0])._probabilities(slices), single._probabilities(slices)
    )
    with pytest.raises(ConfigError, match="between 0.25 and 4"):
        Predictor(model, Preprocessor(), scales=[1.0, 0.0])


def test_tta_of_a_no_flip_checkpoint_is_a_single_pass(trained_ckpt, caplog):
    from seg_densenet.checkpoint import load_model
    from seg_densenet.predict import IDENTITY, build_predictor

    _, record = load_model(trained_ckpt)
    assert not any("Flip" in t["_target_"] for t in record["data"]["augmentation"]["transforms"])
    with caplog.at_level("INFO", logger="seg_densenet.predict"):
        predictor, _ = build_predictor(trained_ckpt, device="cpu", tta=True)
    assert predictor.tta_transforms == (IDENTITY,)
    assert "tta=true is a single pass" in caplog.text


def test_evaluate_passes_tta_to_prediction(monkeypatch, tmp_path):
    """``evaluate ckpt=... predict_options.tta=d4`` hands tta to predict_tree."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import seg_densenet.predict
    from seg_densenet.config import CONFIG_DIR
    from seg_densenet.evaluate import evaluate

    seen = {}

    class Stop(Exception):
        pass

    def fake_predict_tree(ckpt, input, output, **options):
        seen.update(options)
        raise Stop  # before evaluating

    monkeypatch.setattr(seg_densenet.predict, "predict_tree", fake_predict_tree)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                f"ckpt={tmp_path / 'x.ckpt'}",
                f"input={tmp_path}",
                f"output={tmp_path / 'out'}",
                "predict_options.tta=d4",
            ],
        )
    GlobalHydra.instance().clear()
    with pytest.raises(Stop):
        evaluate(cfg)
    assert seen["tta"] == "d4"


def test_onnxruntime_backend_matches_torch_and_caches_its_export(trained_ckpt, synthetic_root, tmp_path):
    from seg_densenet.backends import file_digest
    from seg_densenet.predict import predict_tree

    image = synthetic_root / "patient002" / "patient002_frame01.nii.gz"
    outputs = {}
    for backend in ("torch", "onnxruntime", "auto"):
        out = tmp_path / backend
        predict_tree(
            trained_ckpt,
            image,
            out,
            tta="d4",
            postprocess=None,
            save_probs=True,
            device="cpu",
            precision="32",  # auto would be bf16 on a CPU with AMX, which backend=auto keeps on torch
            backend=backend,
        )
        outputs[backend] = (
            np.asarray(nib.load(out / "patient002_frame01_pred.nii.gz").dataobj),
            np.asarray(nib.load(out / "patient002_frame01_probs.nii.gz").dataobj),
        )
    export = trained_ckpt.with_name(f"{trained_ckpt.name}.{file_digest(trained_ckpt)[:16]}.onnx")
    assert export.is_file()
    (labels, probs), (ort_labels, ort_probs) = outputs["torch"], outputs["onnxruntime"]
    assert np.mean(labels == ort_labels) >= 0.999
    np.testing.assert_allclose(ort_probs, probs, atol=1e-4)
    np.testing.assert_array_equal(outputs["auto"][0], ort_labels)  # auto: onnxruntime on a CPU in fp32


def test_largest_connected_component_inside_the_heart_beats_a_larger_far_island():
    """A false RV island larger than the true RV but apart from the heart is dropped; a structure with
    nothing inside the heart keeps its largest component (the fallback)."""
    from seg_densenet.predict import largest_connected_components

    labels = np.zeros((40, 40, 6), np.uint8)
    labels[4:14, 4:14, 1:5] = 2  # myocardium
    labels[7:11, 7:11, 1:5] = 3  # LV inside it
    labels[14:17, 4:14, 1:5] = 1  # the true RV, against the myocardium: 120 voxels
    labels[28:36, 28:36, 2:4] = 1  # a far island of "RV": 128 voxels
    labels[30:33, 2:5, 3] = 2  # a small far island of myocardium
    out = largest_connected_components(labels)
    assert (out[14:17, 4:14, 1:5] == 1).all() and (out[28:36, 28:36] == 0).all()
    assert (out[30:33, 2:5] == 0).all() and (out[7:11, 7:11, 1:5] == 3).all()
    # per structure alone, the larger island would win
    assert (largest_connected_components(labels, within_heart=False)[28:36, 28:36, 2:4] == 1).all()
    alone = np.zeros_like(labels)
    alone[28:36, 28:36, 2:4] = 1  # no heart elsewhere: it is the heart
    alone[2:4, 2:4, 1] = 3
    kept = largest_connected_components(alone)
    assert (kept[28:36, 28:36, 2:4] == 1).all() and (kept[2:4, 2:4, 1] == 3).all()


@pytest.mark.parametrize("isa_cap", [None, "AVX2"])
def test_precision_auto_is_bf16_where_the_hardware_runs_it_and_keeps_that_on_torch(
    trained_ckpt, isa_cap, monkeypatch
):
    from seg_densenet.backends import OnnxRuntimeModel
    from seg_densenet.inference.predictor import build_predictor
    from seg_densenet.utils.hardware import native_bf16

    if isa_cap:  # oneDNN capped below bf16, as on a CPU without it: the fp32 path
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_cap)
    predictor, _ = build_predictor(trained_ckpt, device="cpu")  # the defaults: precision and backend auto
    bf16 = native_bf16("cpu")
    assert not (isa_cap and bf16)
    assert predictor.autocast_dtype == (torch.bfloat16 if bf16 else None)
    # bf16 runs in torch; fp32 on a CPU goes to ONNX Runtime under backend=auto
    assert isinstance(predictor.model, OnnxRuntimeModel) is not bf16
