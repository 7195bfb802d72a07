"""Attacks: PGD on the fused step (threat models live in maep_fast.evaluate)."""
from maep_fast.attacks.pgd import pgd_attack, random_start

__all__ = ["pgd_attack", "random_start"]
