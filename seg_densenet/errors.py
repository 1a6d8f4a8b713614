"""User-facing errors.

Every error a user can cause (a bad file, a bad config value, a foreign checkpoint) is raised as a
subclass of :class:`SegDenseNetError` whose message is one line naming the file (or setting) and the
problem. The command-line entry points print that line and exit non-zero; ``HYDRA_FULL_ERROR=1``
shows the traceback instead.
"""

from __future__ import annotations


class SegDenseNetError(Exception):
    """An error caused by the user's input; its message is one line."""


class DataError(SegDenseNetError):
    """A data file or folder is missing, unreadable or inconsistent."""


class CheckpointError(SegDenseNetError):
    """A checkpoint or weights file cannot be loaded into the requested model."""


class ConfigError(SegDenseNetError):
    """A configuration value is invalid (unknown model name, missing setting, ...)."""


class StorageError(SegDenseNetError):
    """The machine cannot store an output: the disk is full, the folder is read-only or not ours."""
