"""Hydra/OmegaConf plumbing shared by the command-line apps."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "conf"


def register_resolvers() -> None:
    """Register the ``${sd.repo_root:}`` resolver (idempotent)."""
    if not OmegaConf.has_resolver("sd.repo_root"):
        OmegaConf.register_new_resolver("sd.repo_root", lambda: str(REPO_ROOT))


register_resolvers()
