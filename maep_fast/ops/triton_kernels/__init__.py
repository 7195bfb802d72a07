"""Triton kernels of maep_fast ops (imported lazily, only when the triton backend runs)."""
