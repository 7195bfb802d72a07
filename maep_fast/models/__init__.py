"""Models: the masked autoencoder purifier, presets, LoRA, classifiers."""
from maep_fast.models.classifiers import CLASSIFIERS, SmallCNN, WideResNet
from maep_fast.models.grow import deepen_mae
from maep_fast.models.lora import (
    LoRALinear,
    apply_decoder_lora,
    apply_lora,
    lora_layers,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.models.presets import PRESETS, create_mae

__all__ = [
    "CLASSIFIERS", "LoRALinear", "MaskedAutoencoderViT", "PRESETS", "SmallCNN", "WideResNet",
    "apply_decoder_lora", "apply_lora", "create_mae", "deepen_mae", "lora_layers", "merge_lora", "remove_lora", "unmerge_lora",
]
