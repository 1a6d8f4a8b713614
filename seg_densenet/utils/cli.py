"""How the command-line apps report user errors: one line, non-zero exit, no traceback.

``HYDRA_FULL_ERROR=1`` shows the full traceback instead, as Hydra does for its own errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seg_densenet.errors import SegDenseNetError, StorageError

EXIT_USER_ERROR = 2


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_error(exc: BaseException) -> SegDenseNetError | None:
    """The :class:`SegDenseNetError` behind ``exc`` (Hydra's instantiate wraps errors it calls into),
    or a :class:`~seg_densenet.errors.StorageError` for a write the machine refused outside the
    project's own writers (a logger's file on a full disk)."""
    from seg_densenet.utils.atomic import DISK_FULL, NOT_WRITABLE, storage_error

    chain = []
    while exc is not None and all(exc is not seen for seen in chain):
        if isinstance(exc, SegDenseNetError):
            return exc
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for exc in chain:
        if isinstance(exc, OSError) and exc.filename is not None:
            refused = storage_error(exc, exc.filename, option="output folder")
            if refused is not None:
                return refused
        elif isinstance(exc, OSError) and exc.errno in (*DISK_FULL, *NOT_WRITABLE):
            # a failed write() names no file: say what the machine refused and where to look
            return StorageError(
                f"writing an output failed: {exc.strerror}: free space on the output's disk or "
                "choose another output folder"
            )
    return None


def fail(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr and exit with status 2.

    An error raised in a DataLoader worker reaches the main process with the worker's traceback in its
    message; only the original last line is kept.
    """
    message = str(message)
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(": ", 1)[1] if last.startswith("seg_densenet.errors.") else last
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def run_cli(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a user error (a :class:`SegDenseNetError`, possibly wrapped) prints one line and
    exits with status 2."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        err = user_error(exc)
        if err is None or _full_error():
            raise
        fail(str(err))


def _check_run_dir(argv: list[str]) -> None:
    """The training run's folder (``hydra.run.dir=``, default ``outputs/``) can be created or written:
    Hydra makes it before any of the project's code runs, and fails there with a traceback."""
    from seg_densenet.config_checks import bad_option, writable_folder

    key, value = "hydra.run.dir", "outputs"
    for arg in argv:
        name, _, given = arg.partition("=")
        if name in ("hydra.run.dir", "hydra.sweep.dir"):
            key, value = name, given
    check, allowed = writable_folder(option=f"{key}=")
    if not check(value):
        fail(str(bad_option(key, value, allowed)))


def check_overrides(config_name: str, argv: list[str] | None = None) -> None:
    """Compose the config with the command line's overrides once before Hydra runs, so that a typo, an
    unknown option or a bad value (:func:`seg_densenet.config_checks.validate`) is reported on one line
    before anything is written (Hydra's own report spans several lines).

    Skipped for ``--help``, ``--cfg``, multiruns and anything else that is not a plain run.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from seg_densenet.config import CONFIG_DIR
    from seg_densenet.config_checks import validate

    argv = sys.argv[1:] if argv is None else argv
    if _full_error() or any(a.startswith("-") for a in argv):
        return
    # Hydra's own options are Hydra's to check, except the search path: it decides which configs exist
    overrides = [
        a
        for a in argv
        if a.startswith("hydra.searchpath=") or not a.startswith("hydra.") and not a.startswith("hydra/")
    ]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        missing = [key for key in cfg if OmegaConf.is_missing(cfg, key)]
        if missing:
            fail(f"missing required setting(s): {', '.join(f'{k}=...' for k in missing)}")
        run_cli(validate, config_name, cfg)
        if config_name == "config":
            _check_run_dir(argv)
    except (HydraException, OmegaConfBaseException) as exc:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        text = text.split(" Config search path")[0]  # Hydra's search-path dump says nothing about the error
        fail(f"config ({Path(CONFIG_DIR, config_name + '.yaml')}): {text}")
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
