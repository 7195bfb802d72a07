"""Purification: MAEP single pass (and tiling for large images)."""
from maep_fast.purify.maep import PurifiedClassifier, Purifier
from maep_fast.purify.tiling import tiled_apply

__all__ = ["PurifiedClassifier", "Purifier", "tiled_apply"]
