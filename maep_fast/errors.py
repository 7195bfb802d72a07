"""Exception types shared across maep_fast.

This module sits at the bottom of the package: it imports nothing from
maep_fast, so any layer (models, checkpoint, train, cli) can raise or catch
these without importing the layer that usually raises them.
"""
from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its model."""
