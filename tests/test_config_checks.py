"""Options are checked once, before any work: one line naming the option, the value and what is
allowed, exit status 2, nothing written (seg_densenet/config_checks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from seg_densenet.config import CONFIG_DIR
from seg_densenet.config_checks import validate
from seg_densenet.errors import ConfigError

TRAIN = ["-m", "seg_densenet.train", "experiment=synthetic_quick"]

# (app arguments, the option the error line must name, a fragment of what is allowed)
BAD_OPTIONS = [
    (TRAIN + ["data.batch_size=0"], "data.batch_size=0", "integer >= 1"),
    (TRAIN + ["optim.lr=-1"], "optim.lr=-1", "number > 0"),
    (TRAIN + ["data.crop_size=[16,16]"], "data.crop_size=[16, 16]", "at least [32, 32] for model DenseUNet"),
    (TRAIN + ["model.num_classes=3"], "model.num_classes=3", "data.num_classes=4"),
    (TRAIN + ["data.augmentation.transforms.0.p=2"], "data.augmentation.transforms.0.p=2", "probability"),
    (TRAIN + ["task=segment", "data.context_slices=-1"], "data.context_slices=-1", "integer >= 0"),
    (TRAIN + ["data.context_slices=1"], "data.context_slices=1", "0 with classification pretraining"),
    (
        ["-m", "seg_densenet.predict", "ckpt=no_such.ckpt", "input=.", "output={tmp}/out"],
        "ckpt=no_such.ckpt",
        "existing file",
    ),
    (
        ["-m", "seg_densenet.predict", "ckpt={ckpt}", "input=.", "output={tmp}/out", "tta=maybe"],
        "tta=maybe",
        "one of false, true, d4",
    ),
    (
        ["-m", "seg_densenet.predict", "ckpt={ckpt}", "input=.", "output={ckpt}"],
        "output=",
        "choose another output=",
    ),
    (
        ["-m", "seg_densenet.predict", "ckpt={ckpt}", "input=.", "output={tmp}/out", "scales=[1.0,0]"],
        "scales=[1.0, 0]",
        "list [a, b, ...] of numbers in [0.25, 4]",
    ),
    (
        ["-m", "seg_densenet.evaluate", "pred={tmp}/missing", "gt=.", "output={tmp}/out"],
        "pred=",
        "existing folder",
    ),
    (
        ["-m", "seg_densenet.evaluate", "ckpt={ckpt}", "input=.", "output={tmp}/out", "subset=holdout"],
        "subset=holdout",
        "one of train, val, test",
    ),
    (
        [
            "-m",
            "seg_densenet.evaluate",
            "ckpt={ckpt}",
            "input=.",
            "output={tmp}/out",
            "+predict_options.batch_size=0",
        ],
        "predict_options.batch_size=0",
        "integer >= 1",
    ),
    (
        [
            "-m",
            "seg_densenet.evaluate",
            "ckpt={ckpt}",
            "input=.",
            "output={tmp}/out",
            "predict_options.tta=all",
        ],
        "predict_options.tta=all",
        "one of false, true, d4",
    ),
    (
        ["-m", "seg_densenet.export", "ckpt={ckpt}", "output={tmp}/m.onnx", "opset=5"],
        "opset=5",
        "integer >= 11",
    ),
    (
        ["-m", "seg_densenet.robustness", "ckpt={ckpt}", "input=.", "output={tmp}/out", "patients=0"],
        "patients=0",
        "integer >= 1",
    ),
    (
        ["-m", "seg_densenet.robustness", "ckpt={ckpt}", "input=.", "output={tmp}/out", "batch_size=-4"],
        "batch_size=-4",
        "integer >= 1",
    ),
    (
        ["-m", "seg_densenet.robustness", "ckpt={ckpt}", "input=.", "output={tmp}/out", "device=gpu"],
        "device=gpu",
        "auto, cpu, cuda or cuda:N",
    ),
]


@pytest.mark.parametrize(
    "args, option, allowed", BAD_OPTIONS, ids=[case[1].split("=")[0] for case in BAD_OPTIONS]
)
def test_bad_option_through_the_cli(tmp_path, args, option, allowed):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"only its existence is checked before the checkpoint is read")
    args = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args]
    if args[1] == "seg_densenet.train":
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    proc = run_cli(args, cwd=tmp_path if args[1] != "seg_densenet.train" else None, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert option.format(tmp=tmp_path, ckpt=ckpt) in lines[0] and allowed in lines[0], lines[0]
    # checked before any work: no run folder, no output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


@pytest.fixture()
def compose_app():
    def _compose(app: str, overrides: list[str]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name=app, overrides=overrides)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_passes(compose_app, experiment):
    validate("config", compose_app("config", [f"experiment={experiment}"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_epochs=0"], "trainer.max_epochs=0: must be an integer >= 1"),
        (
            ["data.foreground_fraction=1.5"],
            "data.foreground_fraction=1.5: must be a number in [0, 1] or null",
        ),
        (["data.fold=5"], "data.fold=5: must be an integer in [0, 4] (data.n_folds=5)"),
        (["data.fold=every"], "data.fold=every: must be an integer >= 0 or all"),
        (["trainer.max_steps=0"], "trainer.max_steps=0: must be an integer >= 1 or -1"),
        (
            ["task.segment.module.loss=focal"],
            "task.segment.module.loss=focal: must be one of ce, dice, dice_ce",
        ),
        (
            ["model.encoder_weights=no_such.pth"],
            "model.encoder_weights=no_such.pth: must be imagenet or an existing file or null",
        ),
        (["data.percentiles=[99,1]"], "data.percentiles=[99, 1]: must be [low, high] with low < high"),
        (
            ["task.segment.module.class_weights=[1,1]"],
            "task.segment.module.class_weights=[1, 1]: must be a list of 4 numbers",
        ),
        (["data.val_fraction=1.0"], "data.val_fraction=1.0: must be a number in [0, 1)"),
        (["model=fc_densenet56", "data.crop_size=[16,64]"], "at least [32, 32] for model fc_densenet56"),
        (["model.block_config=[0]"], "model DenseUNet: cannot be built: DenseNet block_config"),
        (
            ["data.target_spacing=[0,1.5]"],
            "data.target_spacing=[0, 1.5]: must be a pair [a, b] of numbers > 0",
        ),
        (["trainer.precision=8"], "trainer.precision=8: must be one of"),
        (
            ["ckpt_path=no_such.ckpt"],
            "ckpt_path=no_such.ckpt: must be last, null or an existing checkpoint file",
        ),
        (
            ["data.structures=[LV,LV]"],
            "data.structures=['LV', 'LV']: must be a list of distinct structure names",
        ),
        (["data.label_mapping={1: -3}"], "data.label_mapping={1: -3}: must be a mapping of label values"),
        (
            ["data.structures=[LV]", "task.segment.module.class_weights=[1,1,1,1]"],
            "must be a list of 2 numbers",
        ),
    ],
)
def test_training_options_checked_in_process(compose_app, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate("config", compose_app("config", ["experiment=synthetic_quick", *overrides]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_list_of_checkpoints_is_checked_file_by_file(compose_app, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    for app in ("predict", "robustness", "evaluate"):
        given = [f"input={tmp_path}", f"output={tmp_path}/out"]
        validate(app, compose_app(app, [f"ckpt=[{ckpt},{ckpt}]", *given]))
        with pytest.raises(ConfigError, match=r"ckpt=.*missing.ckpt.*: must be an existing file or a list"):
            validate(app, compose_app(app, [f"ckpt=[{ckpt},{tmp_path}/missing.ckpt]", *given]))


def test_a_read_only_output_folder_is_refused(compose_app, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    readonly = _readonly_mount(tmp_path / "ro")
    try:
        with pytest.raises(ConfigError, match=r"output=.*ro/sub: must be a folder .*choose another output="):
            validate(
                "predict",
                compose_app("predict", [f"ckpt={ckpt}", f"input={tmp_path}", f"output={readonly}/sub"]),
            )
    finally:
        _unmount(readonly)


def test_a_read_only_run_folder_is_one_line_before_hydra_makes_it(tmp_path):
    readonly = _readonly_mount(tmp_path / "ro")
    try:
        proc = run_cli(
            ["-m", "seg_densenet.train", "experiment=synthetic_quick", f"hydra.run.dir={readonly}/run"],
            timeout=120,
        )
    finally:
        _unmount(readonly)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: hydra.run.dir={readonly}/run: must be a folder this user can create or write into "
        "(choose another hydra.run.dir=)"
    ], proc.stderr[-2000:]


def _readonly_mount(path: Path) -> Path:
    """A read-only tmpfs at ``path`` (root only; the test is skipped where mounting is not allowed)."""
    import subprocess

    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    return path


def _unmount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", str(path)], check=False)


def test_auto_scale_takes_an_ordered_pair_of_percentiles_or_null(compose_app, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    given = [f"ckpt={ckpt}", f"input={tmp_path}", f"output={tmp_path}/out"]
    for app, key in (
        ("predict", "auto_scale"),
        ("robustness", "auto_scale"),
        ("evaluate", "predict_options.auto_scale"),
    ):
        validate(app, compose_app(app, [*given, f"{key}=[10,90]"]))
        validate(app, compose_app(app, [*given, f"{key}=null"]))
        for bad in ("[90,10]", "[5,105]", "[50]"):
            with pytest.raises(ConfigError, match=rf"{key}=.*percentiles, 0 <= low <= high <= 100"):
                validate(app, compose_app(app, [*given, f"{key}={bad}"]))
