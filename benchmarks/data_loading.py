"""Suite ``data``: training slices/s of ``SegmentationDataModule.train_dataloader()`` served from the cache.

A synthetic phantom (``generate_dataset``) is written to a temporary folder and preprocessed into the
volume cache first (timed apart as ``cache_fill_s``), so no NIfTI is decoded in the timed epochs. One call
is one epoch over the training split (cache read, crop, the ``cardiac`` augmentation, collation);
configurations alternate epoch by epoch. Loaders with persistent workers keep them between epochs; the
others start new workers every epoch. Peak memory is the main process's (workers are not counted).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmarks.measure import interleave, summaries
from seg_densenet.data.datamodule import SegmentationDataModule

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DataPlan:
    patients: int = 10
    crop: int = 224
    batch: int = 8
    warmup: int = 1
    repeats: int = 3


PLANS = {
    "full": DataPlan(),
    "quick": DataPlan(patients=3, crop=32, batch=2, warmup=0, repeats=1),
    "cuda": DataPlan(),
}


def _configs(device: torch.device) -> dict[str, dict]:
    """Loader settings per configuration; pinned memory only means something with a GPU to copy to."""
    configs = {
        "0 workers": {"num_workers": 0},
        "2 workers, persistent": {"num_workers": 2, "persistent_workers": True},
        "2 workers, restarted each epoch": {"num_workers": 2, "persistent_workers": False},
    }
    if device.type == "cuda":
        configs["2 workers, persistent, pinned memory"] = {
            "num_workers": 2,
            "persistent_workers": True,
            "pin_memory": True,
        }
    return configs


def epoch_call(loader: torch.utils.data.DataLoader) -> Callable[[], None]:
    def call() -> None:
        for _ in loader:
            pass

    return call


def run(plan: DataPlan, device: torch.device, log: Callable[[str], None] = print) -> dict:
    augmentation = instantiate(OmegaConf.load(REPO / "conf" / "augmentation" / "cardiac.yaml"))
    with tempfile.TemporaryDirectory(prefix="seg-densenet-bench-") as tmp:
        common = {
            "root": Path(tmp) / "synthetic",
            "synthetic": {"patients": plan.patients, "seed": 0},
            "target_spacing": None,
            "crop_size": (plan.crop, plan.crop),
            "cache_dir": Path(tmp) / "cache",
            "batch_size": plan.batch,
            "augmentation": augmentation,
            "n_folds": min(5, plan.patients),  # the quick plan's phantom has fewer than 5 patients
        }
        log("data: generating the phantom and filling the cache ...")
        start = time.perf_counter()
        SegmentationDataModule(**common, num_workers=0).setup()
        cache_fill_s = time.perf_counter() - start
        calls, items = {}, {}
        for name, loader_settings in _configs(device).items():
            dm = SegmentationDataModule(**common, **loader_settings)
            dm.setup()  # reads the filled cache
            loader = dm.train_dataloader()
            calls[name], items[name] = epoch_call(loader), len(loader.dataset)
        log("data: timing epochs ...")
        settings = {
            name: {"crop": [plan.crop, plan.crop], "batch": plan.batch, **s}
            for name, s in _configs(device).items()
        }
        results = interleave(
            calls,
            items,
            device,
            warmup=plan.warmup,
            repeats=plan.repeats,
            settings=settings,
            untimed_in_thread=False,
        )
        del calls, loader, dm  # ends the persistent workers before their folder goes
    return {
        "plan": asdict(plan),
        "cache_fill_s": round(cache_fill_s, 2),
        "augmentation": "conf/augmentation/cardiac.yaml",
        "loaders": summaries(results),
    }
