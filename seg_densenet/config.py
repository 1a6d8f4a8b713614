"""Hydra/OmegaConf plumbing shared by the command-line apps."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "conf"


def first_existing(*paths: str) -> str:
    """The first of ``paths`` that exists, else the last one (so the error names the usual place)."""
    for path in paths:
        if Path(path).exists():
            return str(Path(path).resolve())
    return str(paths[-1])


def register_resolvers() -> None:
    """Register ``${sd.repo_root:}``, ``${sd.first_existing:a,b,...}``, ``${sd.nnunet_structures:DIR}``,
    ``${sd.num_classes:structures}`` and ``${sd.input_channels:context_slices}`` (idempotent)."""
    if not OmegaConf.has_resolver("sd.repo_root"):
        OmegaConf.register_new_resolver("sd.repo_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("sd.first_existing"):
        OmegaConf.register_new_resolver("sd.first_existing", first_existing)
    if not OmegaConf.has_resolver("sd.nnunet_structures"):
        from seg_densenet.data.nnunet import nnunet_structures

        OmegaConf.register_new_resolver("sd.nnunet_structures", nnunet_structures)
    if not OmegaConf.has_resolver("sd.num_classes"):
        from seg_densenet.data.labels import num_classes

        OmegaConf.register_new_resolver("sd.num_classes", num_classes)
    if not OmegaConf.has_resolver("sd.input_channels"):
        from seg_densenet.data.context import input_channels

        OmegaConf.register_new_resolver("sd.input_channels", input_channels)


register_resolvers()
