"""Baseline purifiers to compare against: a DiffPure-style diffusion purifier on diffusers."""
from maep_fast.baselines.diffpure import DDPM_CIFAR10_CONFIG, DiffPure, VPSDE, ddpm_cifar10_unet

__all__ = ["DDPM_CIFAR10_CONFIG", "DiffPure", "VPSDE", "ddpm_cifar10_unet"]
