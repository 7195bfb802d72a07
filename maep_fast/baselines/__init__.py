"""Baseline purifiers to compare against: a DiffPure-style diffusion purifier on diffusers (SDE,
DDIM, and one-step reverse evaluation)."""
from maep_fast.baselines.diffpure import DDPM_CIFAR10_CONFIG, VPSDE, DiffPure, OneStepDiffPure, ddpm_cifar10_unet

__all__ = ["DDPM_CIFAR10_CONFIG", "DiffPure", "OneStepDiffPure", "VPSDE", "ddpm_cifar10_unet"]
