"""Triton kernels for masked-patch attention (forward + FlashAttention-2 style backward).

Contract (launchers below): q, k, v [B, H, L, D] of one float dtype (fp32 / fp16 / bf16;
any strides, made contiguous here), keep optional bool [B, L] (True = visible patch).

- Online softmax in base 2 with fp32 statistics (running max ``m``, running sum ``l``,
  fp32 accumulator); ``tl.dot`` accumulates in fp32.
- Hidden keys (``keep == False``) and out-of-range keys get score -inf, so they carry no
  softmax mass. The running max starts at a finite -1e30, so a block with no visible key
  never produces ``-inf - -inf``.
- Rows of hidden queries are written as exact zeros; a row with no visible key at all
  (a sample with nothing kept) has ``l == 0`` and is also written as zeros (no NaN).
- The logsumexp (natural log, fp32) [B, H, L] is saved for backward; 0 for rows that have
  no visible key.
- Backward: ``_attn_bwd_preprocess_kernel`` computes delta = rowsum(dO * O) in fp32;
  ``_attn_bwd_kernel`` has one program per (block index i, batch*head): it accumulates
  dk, dv of key block i over all query blocks, then dq of query block i over all key
  blocks (no atomics, deterministic). P is recomputed from the saved logsumexp and
  masked by (query visible) & (key visible), so hidden query rows give zero dq and
  contribute nothing to dk / dv.
- The head dim is padded to BLOCK_D = next power of two (>= 16) with masked loads.
- fp32 inputs: ``tl.dot`` runs in IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32``
  is set (then TF32, like torch's own matmul).
- Under the Triton interpreter (``TRITON_INTERPRET=1``) dot operands are cast to fp32
  (its bf16 dot is wrong) and a single configuration is used (no autotune).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


_TILES = ((64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 4, 3))  # BLOCK_M, BLOCK_N, warps, stages
# Rows of >= 1 KB (fp32 at BLOCK_D 256) need 205-279 KB of shared memory with _TILES, over sm_80's
# 163 KB (and 128x32x3 over sm_90's 227 KB); these fit in 100-128 KB (tests/triton_aot_check.py).
_WIDE_ROW_TILES = ((64, 32, 4, 1), (32, 32, 4, 2))
_WIDE_ROW_BYTES = 1024


def _fwd_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _TILES + _WIDE_ROW_TILES]


def _tile(c) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _prune_fwd(configs, named_args, **kwargs):
    """Wide rows get the small-footprint tiles only; others drop blocks far larger than L (tiny
    sequences) and the 128x64 tile for head dims >= 128."""
    length, block_d = named_args["L"], kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    if block_d * named_args["Q"].element_size() >= _WIDE_ROW_BYTES:
        return [c for c in configs if _tile(c) in _WIDE_ROW_TILES] or configs[:1]
    keep = [c for c in configs
            if _tile(c) in _TILES
            and c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(length))
            and not (block_d >= 128 and c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 64)]
    return keep or configs[:1]


@triton.jit
def _visible(KEEP, b, L, offs, valid, HAS_KEEP: tl.constexpr):
    """Positions ``offs`` of sample ``b`` that are in range and kept (all in-range ones without a mask)."""
    vis = valid
    if HAS_KEEP:
        vis = (tl.load(KEEP + b * L + offs, mask=valid, other=0) != 0) & valid
    return vis


@triton.jit
def _rows(base, start, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``start .. start+BLOCK`` of one [L, D] head: (row indices, rows in range,
    element offsets [BLOCK, BLOCK_D], element mask [BLOCK, BLOCK_D])."""
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs < L
    return offs, valid, base + offs[:, None] * D + offs_d[None, :], valid[:, None] & (offs_d < D)[None, :]


@triton.jit
def _query_stats(LSE, DELTA, KEEP, b, row_base, L, offs_m, m_valid, HAS_KEEP: tl.constexpr):
    """Saved logsumexp (base 2), delta = rowsum(dO * O) and visibility of query rows ``offs_m``."""
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_valid, other=0.0)
    return lse2, delta, _visible(KEEP, b, L, offs_m, m_valid, HAS_KEEP)


@triton.jit
def _probs(q, k, lse2, vis, qk_scale, PRECISION: tl.constexpr):
    """Softmax P recomputed from the saved logsumexp, zero where the query or the key is hidden."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
    return tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)


@triton.jit
def _dscores(p, do, v, delta, PRECISION: tl.constexpr):
    """dS = P * (dO V^T - delta)."""
    return p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])


@triton.jit
def _load_pair(A, B, off, mask, DOT_F32: tl.constexpr):
    """Two [rows, BLOCK_D] tiles at the same offsets (q/do or k/v), as fp32 when dots run in fp32."""
    a = tl.load(A + off, mask=mask, other=0.0)
    b = tl.load(B + off, mask=mask, other=0.0)
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.autotune(configs=_fwd_configs(), key=["L", "BLOCK_D", "HAS_KEEP", "DOT_F32"],
                 prune_configs_by=None if _INTERPRET else {"early_config_prune": _prune_fwd})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, KEEP, O, LSE,
    H, L, D, qk_scale,  # qk_scale = scale * log2(e)
    HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # B*H on axis 0: axis 1 is capped at 65535 programs
    pid_m = tl.program_id(1)
    b = pid_bh // H
    base = pid_bh.to(tl.int64) * L * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < L
    d_valid = offs_d < D
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_vis = _visible(KEEP, b, L, offs_m, m_valid, HAS_KEEP)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < L
        kv_off = base + offs_n[:, None] * D + offs_d[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k, v = _load_pair(K, V, kv_off, kv_mask, DOT_F32)
        k_vis = _visible(KEEP, b, L, offs_n, n_valid, HAS_KEEP)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(k_vis[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    row_ok = q_vis & has_mass
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_mass, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, 0.0)
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * L + offs_m, lse, mask=m_valid)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, L, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)  # B*H on axis 0: axis 1 is capped at 65535 programs
    pid_m = tl.program_id(1)
    offs_m, m_valid, off, mask = _rows(pid_bh.to(tl.int64) * L * D, pid_m * BLOCK_M, L, D, BLOCK_M, BLOCK_D)
    o, do = _load_pair(O, DO, off, mask, True)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=m_valid)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, KEEP, DO, LSE, DELTA, DQ, DK, DV,
    H, L, D, sm_scale, qk_scale,  # qk_scale = sm_scale * log2(e)
    HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid_bh // H
    base = pid_bh.to(tl.int64) * L * D
    row_base = pid_bh.to(tl.int64) * L

    # ---- dk, dv for key block `pid` ------------------------------------------------
    offs_n, n_valid, n_off, n_mask = _rows(base, pid * BLOCK_N, L, D, BLOCK_N, BLOCK_D)
    k, v = _load_pair(K, V, n_off, n_mask, DOT_F32)
    k_vis = _visible(KEEP, b, L, offs_n, n_valid, HAS_KEEP)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m, m_valid, m_off, m_mask = _rows(base, start_m, L, D, BLOCK_M, BLOCK_D)
        q, do = _load_pair(Q, DO, m_off, m_mask, DOT_F32)
        lse2, delta, q_vis = _query_stats(LSE, DELTA, KEEP, b, row_base, L, offs_m, m_valid, HAS_KEEP)
        p = _probs(q, k, lse2, q_vis[:, None] & k_vis[None, :], qk_scale, PRECISION)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        ds = _dscores(p, do, v, delta, PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(DK + n_off, dk.to(DK.dtype.element_ty), mask=n_mask)
    tl.store(DV + n_off, dv.to(DV.dtype.element_ty), mask=n_mask)

    # ---- dq for query block `pid` --------------------------------------------------
    offs_m, m_valid, m_off, m_mask = _rows(base, pid * BLOCK_M, L, D, BLOCK_M, BLOCK_D)
    q, do = _load_pair(Q, DO, m_off, m_mask, DOT_F32)
    lse2, delta, q_vis = _query_stats(LSE, DELTA, KEEP, b, row_base, L, offs_m, m_valid, HAS_KEEP)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n2, n_valid2, kv_off, kv_mask = _rows(base, start_n, L, D, BLOCK_N, BLOCK_D)
        k2, v2 = _load_pair(K, V, kv_off, kv_mask, DOT_F32)
        k_vis2 = _visible(KEEP, b, L, offs_n2, n_valid2, HAS_KEEP)
        p = _probs(q, k2, lse2, q_vis[:, None] & k_vis2[None, :], qk_scale, PRECISION)
        ds = _dscores(p, do, v2, delta, PRECISION)
        dq += tl.dot(ds.to(k2.dtype), k2, input_precision=PRECISION)
    dq = tl.where(q_vis[:, None], dq * sm_scale, 0.0)
    tl.store(DQ + m_off, dq.to(DQ.dtype.element_ty), mask=m_mask)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------

def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless torch allows TF32 matmuls (fp16/bf16 operands ignore this)."""
    if dtype == torch.float32 and not _INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _keep_arg(keep, q):
    if keep is None:
        return q, False  # dummy pointer, never read (HAS_KEEP=False)
    return keep.contiguous().view(torch.uint8), True


def _check_out(buf, name, shape, dtype, device):
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {list(shape)} on {device}")
    return buf


def attn_fwd(q, k, v, keep=None, scale=None, *, out=None, lse=None):
    """Forward launcher: returns (out [B, H, L, D] in q.dtype, lse [B, H, L] fp32).

    ``out`` / ``lse`` are private (tests): preallocated contiguous buffers to write into.
    """
    b, h, length, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q head dim D={d} exceeds the Triton kernel's maximum {MAX_HEAD_DIM}")
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = _check_out(out, "out", q.shape, q.dtype, q.device)
    lse = _check_out(lse, "lse", (b, h, length), torch.float32, q.device)
    keep_t, has_keep = _keep_arg(keep, q)
    block_d = _block_d(d)
    dot_f32 = _INTERPRET or q.dtype == torch.float32

    def grid(meta):
        return (b * h, triton.cdiv(length, meta["BLOCK_M"]))

    _attn_fwd_kernel[grid](
        q, k, v, keep_t, out, lse, h, length, d, scale * _LOG2E,
        HAS_KEEP=has_keep, DOT_F32=dot_f32, PRECISION=_precision(q.dtype), BLOCK_D=block_d,
    )
    return out, lse


def _bwd_block(d: int) -> int:
    if _INTERPRET:
        return 64
    return 64 if d <= 64 else 32


def attn_bwd(do, q, k, v, keep, out, lse, scale=None, *, dq=None, dk=None, dv=None):
    """Backward launcher: returns (dq, dk, dv) in q.dtype. ``dq/dk/dv`` are private (tests)."""
    b, h, length, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q head dim D={d} exceeds the Triton kernel's maximum {MAX_HEAD_DIM}")
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    do, out, lse = do.contiguous(), out.contiguous(), lse.contiguous()
    dq = _check_out(dq, "dq", q.shape, q.dtype, q.device)
    dk = _check_out(dk, "dk", q.shape, q.dtype, q.device)
    dv = _check_out(dv, "dv", q.shape, q.dtype, q.device)
    keep_t, has_keep = _keep_arg(keep, q)
    block_d = _block_d(d)
    delta = torch.empty((b, h, length), dtype=torch.float32, device=q.device)
    pre_block = 64
    _attn_bwd_preprocess_kernel[(b * h, triton.cdiv(length, pre_block))](
        out, do, delta, length, d, BLOCK_M=pre_block, BLOCK_D=block_d,
    )
    blk = _bwd_block(d)
    _attn_bwd_kernel[(b * h, triton.cdiv(length, blk))](
        q, k, v, keep_t, do, lse, delta, dq, dk, dv, h, length, d, scale, scale * _LOG2E,
        HAS_KEEP=has_keep, DOT_F32=_INTERPRET or q.dtype == torch.float32,
        PRECISION=_precision(q.dtype), BLOCK_D=block_d, BLOCK_M=blk, BLOCK_N=blk,
        num_warps=4, num_stages=1 if _INTERPRET else 2,
    )
    return dq, dk, dv


__all__ = ["attn_fwd", "attn_bwd", "MAX_HEAD_DIM", "_attn_fwd_kernel", "_attn_bwd_preprocess_kernel",
           "_attn_bwd_kernel"]
