"""maep_fast: fast masked-autoencoder adversarial purifiers.

Public API::

    from maep_fast import MaskedAutoencoderViT, create_mae, Purifier, PurifiedClassifier
    purifier = Purifier.from_checkpoint("runs/demo/maep")
    x_clean = purifier.purify(x_adv)            # [N, C, H, W] in [0, 1]
"""
from maep_fast._native import native_available
from maep_fast.attacks.pgd import pgd_attack
from maep_fast.checkpoint import CheckpointError, load_model, save_model
from maep_fast.models.classifiers import SmallCNN, WideResNet
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.models.mae_import import load_pretrained_mae, mae_from_checkpoint
from maep_fast.models.presets import PRESETS, create_mae
from maep_fast.purify.mae_pure import MAEPure
from maep_fast.purify.maep import PurifiedClassifier, Purifier
from maep_fast.purify.randomized import RandomizedMAEP

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "MAEPure", "MaskedAutoencoderViT", "PRESETS", "PurifiedClassifier", "Purifier",
    "RandomizedMAEP", "SmallCNN", "WideResNet", "create_mae", "load_model", "load_pretrained_mae",
    "mae_from_checkpoint", "native_available", "pgd_attack", "save_model", "__version__",
]
