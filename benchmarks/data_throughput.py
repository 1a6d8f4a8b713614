"""Training-slice throughput of the data pipeline, served from the preprocessed-volume cache.

Measures slices/s of ``SegmentationDataModule.train_dataloader()`` (cache read, crop, augmentation,
collation) for each worker count, with and without the default augmentation. The cache is filled
first, so no NIfTI is decoded during the timed passes.

    python benchmarks/data_throughput.py                        # synthetic phantom (data/synthetic), 40 patients
    python benchmarks/data_throughput.py --root ../shared/data/acdc/training --crop 192 192 --spacing none
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from seg_densenet.data.datamodule import SegmentationDataModule

REPO = Path(__file__).resolve().parents[1]


def measure(dm: SegmentationDataModule, epochs: int) -> float:
    """Slices per second over ``epochs`` passes (after one warm-up batch that starts the workers)."""
    loader = dm.train_dataloader()
    iterator = iter(loader)
    next(iterator)
    start, n = time.perf_counter(), 0
    for batch in iterator:
        n += len(batch["case"])
    for _ in range(epochs - 1):
        for batch in loader:
            n += len(batch["case"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO / "data" / "synthetic"))
    parser.add_argument(
        "--patients",
        type=int,
        default=40,
        help="synthetic patients if --root has no data (as conf/data/synthetic.yaml)",
    )
    parser.add_argument("--cache-dir", default=str(REPO / "data" / "cache"))
    parser.add_argument("--crop", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--spacing", default="2.0", help="in-plane target spacing in mm, or 'none'")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 2))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    # generate the phantom only where there is no dataset yet (never into a real one)
    has_data = Path(args.root).is_dir() and any(Path(args.root).glob("*/Info.cfg"))
    synthetic = None if has_data else {"patients": args.patients, "seed": 0}
    spacing = None if args.spacing == "none" else (float(args.spacing),) * 2
    augmentation = instantiate(OmegaConf.load(REPO / "conf" / "augmentation" / "cardiac.yaml"))
    for augment in (None, augmentation):
        for workers in args.workers:
            dm = SegmentationDataModule(
                args.root,
                synthetic=synthetic,
                target_spacing=spacing,
                crop_size=tuple(args.crop),
                cache_dir=args.cache_dir,
                batch_size=args.batch_size,
                num_workers=workers,
                augmentation=augment,
                persistent_workers=workers > 0,
            )
            dm.prepare_data()
            dm.setup()
            rate = measure(dm, args.epochs)
            print(
                f"crop {args.crop[0]}x{args.crop[1]}  batch {args.batch_size}  workers {workers}  "
                f"augmentation {'cardiac' if augment else 'none':7s}  {rate:8.0f} slices/s  "
                f"({len(dm.train_dataloader().dataset)} slices, cache hits {dm.cache.hits}, misses {dm.cache.misses})"
            )


if __name__ == "__main__":
    main()
