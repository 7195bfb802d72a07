"""Attacks: PGD on the fused step, EOT and BPDA wrappers, torchattacks adapters
(threat-model evaluation lives in maep_fast.evaluate)."""
from maep_fast.attacks.bpda import BPDA, bpda_model
from maep_fast.attacks.eot import EOT, eot_grad
from maep_fast.attacks.pgd import pgd_attack, random_start
from maep_fast.attacks.torchattacks_adapter import build_attack, run_attack

__all__ = ["BPDA", "EOT", "bpda_model", "build_attack", "eot_grad", "pgd_attack", "random_start", "run_attack"]
