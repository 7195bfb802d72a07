"""Purification: MAEP single pass (tiling for large images), MAEP with test-time masks,
MAE-Pure test-time descent, AMV diagnostic."""
from maep_fast.purify.amv import attention_matrix_variation, decoder_attention_maps, save_amv_heatmap
from maep_fast.purify.mae_pure import MAEPure
from maep_fast.purify.maep import PurifiedClassifier, Purifier
from maep_fast.purify.randomized import RandomizedMAEP
from maep_fast.purify.tiling import tiled_apply

__all__ = ["MAEPure", "PurifiedClassifier", "Purifier", "RandomizedMAEP", "attention_matrix_variation",
           "decoder_attention_maps", "save_amv_heatmap", "tiled_apply"]
