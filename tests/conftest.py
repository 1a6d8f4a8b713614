"""Shared fixtures: the real Hydra config composed for tests, and a tiny synthetic dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from seg_densenet.config import CONFIG_DIR, REPO_ROOT

# two cores: keep intra-op threads predictable, and leave the other core to data workers
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_ACDC = REPO_ROOT.parent / "shared" / "data" / "acdc" / "training"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Six small synthetic patients in the ACDC layout, generated once per test session."""
    from seg_densenet.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    return generate_dataset(root, n_patients=6, seed=3, image_size=(96, 96))


def quick_overrides(tmp_path: Path, synthetic_root: Path) -> list[str]:
    """Overrides that shrink the synthetic_quick experiment to seconds and keep every file in tmp_path."""
    return [
        "experiment=synthetic_quick",
        f"data.root={synthetic_root}",
        "data.synthetic=null",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "data.crop_size=[64,64]",
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=2",
        "++trainer.enable_model_summary=false",
    ]


@pytest.fixture()
def compose_cfg(tmp_path):
    """Compose the real config (conf/config.yaml) with overrides, as the CLI would."""

    def _compose(overrides: list[str], output_dir: Path | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir or tmp_path / "run")
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run ``python -m ...`` in a subprocess; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("HYDRA_FULL_ERROR", None)
    if env and "HYDRA_FULL_ERROR" in env:
        full_env["HYDRA_FULL_ERROR"] = env["HYDRA_FULL_ERROR"]
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd or REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_config(overrides: list[str], output_dir: Path):
    """Compose conf/config.yaml with overrides outside a fixture (for session-scoped fixtures)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory, synthetic_root) -> Path:
    """A segmentation checkpoint from a real (tiny) training run: one epoch of a small DenseUNet."""
    from seg_densenet.train import train

    tmp = tmp_path_factory.mktemp("trained")
    overrides = [*quick_overrides(tmp, synthetic_root), "task=segment", "test=false", "model.drop_rate=0.1"]
    cfg = compose_config(overrides, tmp / "run")
    train(cfg)
    return tmp / "run" / "checkpoints" / "last.ckpt"
