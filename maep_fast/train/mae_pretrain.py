"""Standard MAE pretraining (He et al., 2022) on clean images.

Per batch x (labels unused): random masking at ``mask_ratio`` (0.75, MAE's
default), encoder on the visible patches, decoder, and the model's own
``forward_loss``: the fused ``maep_fast.ops.patch_recon_loss`` (mean squared
error over the *removed* patches; per-patch normalized target when
``norm_pix_loss``). This is the MAE that MAE-Pure purifies with.

``train="decoder"`` freezes the encoder and trains only the decoder parts
(``decoder_embed``, ``mask_token``, ``decoder_blocks``, ``decoder_norm``,
``decoder_pred``): it finishes a published encoder-only checkpoint
(``load_pretrained_mae`` warns that such a decoder is untrained) without
touching the published encoder.

Runs on ``maep_fast.train.loop.fit``: AdamW + warmup/cosine, tqdm progress,
resumable snapshots (``cfg.loop.state_dir`` / ``resume``), torchrun-aware.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from maep_fast._checks import check_real
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.train.loop import LoopConfig, fit

DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")
TRAIN_CHOICES = ("all", "decoder")


@dataclass
class MAEPretrainConfig:
    mask_ratio: float = 0.75  # MAE's default
    norm_pix_loss: bool | None = None  # None: keep the model's setting; True/False: set it (recorded in model.config)
    train: str = "all"  # "all" | "decoder" (frozen encoder: finishes a published encoder's decoder)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=50, lr=1.5e-3, warmup_epochs=2.0,
                                                                desc="MAE pretrain"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError / TypeError naming the first bad field (``train_mae`` runs it again)."""
        try:
            check_real(self.mask_ratio, "mask_ratio", low=0, high=1, low_open=True, high_open=True)
        except ValueError:
            raise ValueError(f"mask_ratio must be a number in (0, 1), got {self.mask_ratio!r}") from None
        if self.train not in TRAIN_CHOICES:
            raise ValueError(f"train must be one of {TRAIN_CHOICES}, got {self.train!r}")
        if self.norm_pix_loss is not None and not isinstance(self.norm_pix_loss, bool):
            raise TypeError(f"norm_pix_loss must be None or a bool, got {self.norm_pix_loss!r}")
        if not isinstance(self.loop, LoopConfig):
            raise TypeError(f"loop must be a LoopConfig, got {type(self.loop).__name__}")
        self.loop.validate()


def mae_trainable_parameters(model: MaskedAutoencoderViT, train: str = "all") -> list[torch.nn.Parameter]:
    """The parameters ``train_mae`` updates: every trainable one, or the decoder's only."""
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train must be one of {TRAIN_CHOICES}, got {train!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if train == "decoder":
        named = [(n, p) for n, p in named if n.startswith(DECODER_PREFIXES)]
    return [p for _, p in named]


def train_mae(model: MaskedAutoencoderViT, dataset, cfg: MAEPretrainConfig | None = None) -> list[dict]:
    """MAE pretraining of ``model`` on ``dataset`` (an ImageDataset or anything with
    ``loader(batch_size, shuffle, seed, drop_last)`` yielding ``(images, ...)``).

    Returns the per-epoch metrics (``loss``: masked reconstruction loss). With
    ``cfg.train == "decoder"`` the encoder's parameters are frozen during the
    call and their ``requires_grad`` flags restored afterwards.
    """
    cfg = cfg or MAEPretrainConfig()
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"model must be a MaskedAutoencoderViT, got {type(model).__name__}")
    if not isinstance(cfg, MAEPretrainConfig):
        raise TypeError(f"cfg must be a MAEPretrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    if cfg.norm_pix_loss is not None and cfg.norm_pix_loss != model.norm_pix_loss:
        model.norm_pix_loss = cfg.norm_pix_loss
        model.config["norm_pix_loss"] = cfg.norm_pix_loss  # the checkpoint records what the decoder outputs
    params = mae_trainable_parameters(model, cfg.train)
    if not params:
        raise ValueError(f"model has no trainable parameters for train={cfg.train!r}")
    trained = {id(p) for p in params}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        if id(p) not in trained:
            p.requires_grad_(False)
    ratio = float(cfg.mask_ratio)

    def step(x, *rest):
        loss, _, _ = model(x, mask_ratio=ratio)  # forward_loss: fused patch_recon_loss on removed patches
        return loss, {"loss": loss.detach()}

    run_cfg = {"stage": "mae_pretrain", "model": model.config, "mask_ratio": ratio, "train": cfg.train,
               "norm_pix_loss": model.norm_pix_loss, "lr": cfg.loop.lr, "batch_size": cfg.loop.batch_size,
               "weight_decay": cfg.loop.weight_decay, "seed": cfg.loop.seed}
    try:
        return fit(model, params, dataset, step, cfg.loop, run_cfg)
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
