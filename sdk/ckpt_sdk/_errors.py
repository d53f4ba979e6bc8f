"""Exceptions raised by ckpt_sdk.

CheckpointError                 base of everything the SDK raises on purpose
 +-- CheckpointConfigError      bad argument or CKPT_* variable (also a ValueError)
 +-- CorruptCheckpointError     a checkpoint failed manifest or checksum verification
 +-- FencedError                a newer attempt owns the directory; this commit was refused
 +-- IncompatibleCheckpointError a newer ckpt_sdk wrote this checkpoint; upgrade to load it
 +-- UnsupportedStateError      the state holds a value the SDK cannot store without pickle (also a TypeError)
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class for every error the SDK raises on purpose."""


class CheckpointConfigError(CheckpointError, ValueError):
    """An argument or a CKPT_* environment variable is invalid."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint on disk is incomplete, truncated or fails its checksums."""


class FencedError(CheckpointError):
    """A newer attempt has claimed the checkpoint directory; an older writer may not commit."""


class UnsupportedStateError(CheckpointError, TypeError):
    """A value in the state cannot be stored safely (no pickle is ever used)."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint was written by a newer ckpt_sdk in a format this version cannot read."""
