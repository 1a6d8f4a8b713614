"""How the command-line apps report user errors: one line, non-zero exit, no traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from seg_densenet.errors import SegDenseNetError

EXIT_USER_ERROR = 2


def run_cli(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a :class:`SegDenseNetError` prints ``error: <message>`` and exits with status 2.

    ``HYDRA_FULL_ERROR=1`` re-raises instead, so the full traceback is shown.
    """
    try:
        return fn(*args, **kwargs)
    except SegDenseNetError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
