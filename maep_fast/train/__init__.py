"""Training: classifiers, MAE pretraining, MAEP's two stages, RMAE-Pure, shared loop and checkpoints."""
from maep_fast.train.classifier import accuracy, train_classifier
from maep_fast.train.loop import LoopConfig, fit
from maep_fast.train.mae_pretrain import MAEPretrainConfig, train_mae
from maep_fast.train.maep import (
    AdversarialPairs,
    AttackConfig,
    MAEPConfig,
    maep_loss,
    make_adversarial,
    train_maep,
    train_stage1,
    train_stage2,
)
from maep_fast.train.rmae_pure import RMAEPureConfig, train_rmae_pure

__all__ = [
    "AdversarialPairs", "AttackConfig", "LoopConfig", "MAEPConfig", "MAEPretrainConfig", "RMAEPureConfig", "accuracy",
    "fit", "maep_loss", "make_adversarial", "train_classifier", "train_mae", "train_maep", "train_rmae_pure",
    "train_stage1", "train_stage2",
]
