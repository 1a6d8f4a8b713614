"""Lightning DDP under Hydra, without the two known pitfalls.

Lightning's ``ddp`` strategy starts ranks 1..N-1 by re-running the command line. Under a Hydra
multirun that command line still holds ``-m`` and the sweep, so every child would start a sweep of
its own (duplicate run directories), and the children would write into ``hydra.run.dir`` instead of
the job's sweep directory. Here the children re-run the *job's* overrides in single-run mode, in the
job's own output directory. After a job, the main process drops the process group and the launch
variables, so that the next job of a multirun starts fresh children only after this one ended.

The children's command comes from replacing lightning_fabric's private ``_hydra_subprocess_cmd`` (Lightning
has no public hook for it). ``test_the_private_lightning_hook_that_the_ddp_patch_replaces_is_still_there``
fails when Lightning renames that function, changes its signature or stops calling it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

_LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task)
    command += [
        f"hydra.run.dir={hydra_cfg.runtime.output_dir}",
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def patch_lightning_hydra_launcher() -> None:
    """Make Lightning's subprocess launcher start DDP children for the current Hydra job only."""
    from lightning_fabric.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = _job_subprocess_cmd


def release_ddp_children() -> None:
    """In the main process after a DDP job: drop the process group and the launch variables."""
    import torch.distributed as dist

    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name in _LAUNCH_VARIABLES:
        os.environ.pop(name, None)
