"""Triton kernels for masked-patch attention (forward + FlashAttention-2 style backward).

Inputs (launchers below): arguments that meet the op's contract (``maep_fast.ops.masked_patch_attention``,
module docstring), in fp32 / fp16 / bf16 with head dim <= MAX_HEAD_DIM; any strides (made contiguous here).

- Online softmax in base 2 with fp32 statistics (running max ``m``, running sum ``l``,
  fp32 accumulator); ``tl.dot`` accumulates in fp32.
- Keep masks shrink the work: ``_visible_index_kernel`` (one program per sample, on the
  device, no host sync) builds ``vis`` int32 [B, L], each sample's visible token indices
  in ascending order followed by its hidden ones (a stable partition: what a stable sort of
  ``~keep`` gives), and ``count`` int32 [B], the number of visible tokens. The attention
  kernels then work on *packed positions*: packed position ``p`` of sample ``b`` is token
  ``vis[b, p]``; q / k / v / dO rows are gathered through ``vis`` (indirect loads). A
  program of query (or key) block ``i`` whose start ``i * BLOCK >= count`` holds hidden
  tokens only: it writes their zeros and reads nothing else (the grid stays
  ``cdiv(L, BLOCK)``, so nothing waits for ``count`` on the host). Every other program
  loops over ``cdiv(count, BLOCK_N)`` key blocks (``cdiv(count, BLOCK_M)`` query blocks in
  the dk/dv pass), not ``cdiv(L, BLOCK_N)``: the cost is ``count**2`` per sample, not
  ``L**2``. Hidden tokens are never loaded as keys. Without a mask (``keep=None``) packed
  position = token index and ``count = L``: the plain kernels, no gather, no branch.
- In the last partial block, packed positions ``>= count`` get score -inf (keys) or are
  zeroed (queries). The running max starts at a finite -1e30.
- Rows of hidden queries are written as exact zeros with logsumexp 0; a sample with no
  visible token has ``count == 0`` and all its rows are zeros (no NaN). dq / dk / dv rows of
  hidden tokens are written as exact zeros. Every row is written (``vis`` is a
  permutation), so the outputs need no zero-initialization.
- The logsumexp (natural log, fp32) [B, H, L] is saved for backward, at token positions.
- Backward: ``_attn_bwd_preprocess_kernel`` computes delta = rowsum(dO * O) in fp32 for the
  visible rows; ``_attn_bwd_kernel`` has one program per (block index i, batch*head): it
  accumulates dk, dv of packed key block i over the visible query blocks, then dq of packed
  query block i over the visible key blocks (no atomics, deterministic). P is recomputed
  from the saved logsumexp.
- Debug (tests): ``COUNT_VISITS`` makes each program store how many key (or query) blocks
  its loop visited, to check the work follows ``count`` without timing anything.
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
def _visible_index_kernel(KEEP, VIS, CNT, L, BLOCK_L: tl.constexpr):
    """Sample ``b``: VIS[b] = visible token indices ascending, then hidden ones ascending;
    CNT[b] = number of visible tokens. Two passes over the mask (count, then scatter)."""
    b = tl.program_id(0)
    row = b.to(tl.int64) * L
    n_vis = tl.full([], 0, tl.int32)
    for start in range(0, L, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        kept = tl.load(KEEP + row + offs, mask=offs < L, other=0) != 0
        n_vis += tl.sum(kept.to(tl.int32), 0)
    seen_vis = tl.full([], 0, tl.int32)
    seen_hid = n_vis
    for start in range(0, L, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        valid = offs < L
        kept = (tl.load(KEEP + row + offs, mask=valid, other=0) != 0) & valid
        is_vis = kept.to(tl.int32)
        is_hid = valid.to(tl.int32) - is_vis
        rank_vis = tl.cumsum(is_vis, 0)  # inclusive
        rank_hid = tl.cumsum(is_hid, 0)
        dest = tl.where(kept, seen_vis + rank_vis - 1, seen_hid + rank_hid - 1)
        tl.store(VIS + row + dest, offs, mask=valid)
        seen_vis += tl.sum(is_vis, 0)
        seen_hid += tl.sum(is_hid, 0)
    tl.store(CNT + b, n_vis)


@triton.jit
def _n_visible(CNT, b, L, HAS_KEEP: tl.constexpr):
    """Visible tokens of sample ``b`` (all ``L`` without a mask)."""
    if HAS_KEEP:
        n = tl.load(CNT + b)
    else:
        n = L
    return n


@triton.jit
def _tokens(VIS, b, L, pos, valid, HAS_KEEP: tl.constexpr):
    """Token indices of packed positions ``pos`` of sample ``b`` (gathered through VIS where
    ``valid``; the positions themselves without a mask)."""
    if HAS_KEEP:
        tok = tl.load(VIS + b.to(tl.int64) * L + pos, mask=valid, other=0)
    else:
        tok = pos
    return tok


@triton.jit
def _block_rows(VIS, b, base, start, L, D, n_vis, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_KEEP: tl.constexpr):
    """Packed positions ``start .. start+BLOCK`` of one [L, D] head: (token indices, positions
    that are visible (< n_vis), element offsets [BLOCK, BLOCK_D], element mask of the visible
    rows [BLOCK, BLOCK_D])."""
    pos = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    vis = pos < n_vis
    tok = _tokens(VIS, b, L, pos, vis, HAS_KEEP)
    return tok, vis, base + tok[:, None] * D + offs_d[None, :], vis[:, None] & (offs_d < D)[None, :]


@triton.jit
def _store_rows(VIS, b, base, start, L, D, PTR, val, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_KEEP: tl.constexpr):
    """Store ``val`` [BLOCK, BLOCK_D] into the rows of packed positions ``start .. start+BLOCK``
    (every in-range position: visible and hidden tokens alike)."""
    pos = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    in_range = pos < L
    tok = _tokens(VIS, b, L, pos, in_range, HAS_KEEP)
    tl.store(PTR + base + tok[:, None] * D + offs_d[None, :], val.to(PTR.dtype.element_ty),
             mask=in_range[:, None] & (offs_d < D)[None, :])
    return tok, in_range


@triton.jit
def _query_stats(LSE, DELTA, row_base, tok, vis):
    """Saved logsumexp (base 2) and delta = rowsum(dO * O) of the visible query rows ``tok``."""
    lse2 = tl.load(LSE + row_base + tok, mask=vis, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + tok, mask=vis, other=0.0)
    return lse2, delta


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


@triton.jit
def _fwd_rows(Q, K, V, VIS, b, base, start_m, L, D, n_vis, qk_scale,
              HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Output rows and logsumexp of packed query block ``start_m`` over the visible keys
    (``cdiv(n_vis, BLOCK_N)`` key blocks); and the number of key blocks visited."""
    tok_m, m_vis, q_off, q_mask = _block_rows(VIS, b, base, start_m, L, D, n_vis, BLOCK_M, BLOCK_D, HAS_KEEP)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visits = tl.full([], 0, tl.int32)
    for start_n in range(0, n_vis, BLOCK_N):
        tok_n, n_vis_k, kv_off, kv_mask = _block_rows(VIS, b, base, start_n, L, D, n_vis, BLOCK_N, BLOCK_D,
                                                      HAS_KEEP)
        k, v = _load_pair(K, V, kv_off, kv_mask, DOT_F32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_vis_k[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        visits += 1
    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    out = tl.where((m_vis & has_mass)[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(m_vis & has_mass, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, 0.0)
    return out, lse, visits


@triton.autotune(configs=_fwd_configs(), key=["L", "BLOCK_D", "HAS_KEEP", "DOT_F32"],
                 prune_configs_by=None if _INTERPRET else {"early_config_prune": _prune_fwd})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, VIS, CNT, O, LSE, VISITS,
    H, L, D, qk_scale,  # qk_scale = scale * log2(e)
    HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # B*H on axis 0: axis 1 is capped at 65535 programs
    pid_m = tl.program_id(1)
    b = pid_bh // H
    base = pid_bh.to(tl.int64) * L * D
    start_m = pid_m * BLOCK_M
    n_vis = _n_visible(CNT, b, L, HAS_KEEP)
    if HAS_KEEP:
        if start_m < n_vis:
            out, lse, visits = _fwd_rows(Q, K, V, VIS, b, base, start_m, L, D, n_vis, qk_scale, HAS_KEEP,
                                         DOT_F32, PRECISION, BLOCK_D, BLOCK_M, BLOCK_N)
        else:  # hidden tokens only: zeros, nothing read
            out = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            lse = tl.zeros([BLOCK_M], dtype=tl.float32)
            visits = tl.full([], 0, tl.int32)
    else:
        out, lse, visits = _fwd_rows(Q, K, V, VIS, b, base, start_m, L, D, n_vis, qk_scale, HAS_KEEP,
                                     DOT_F32, PRECISION, BLOCK_D, BLOCK_M, BLOCK_N)
    tok_m, m_in = _store_rows(VIS, b, base, start_m, L, D, O, out, BLOCK_M, BLOCK_D, HAS_KEEP)
    tl.store(LSE + pid_bh.to(tl.int64) * L + tok_m, lse, mask=m_in)
    if COUNT_VISITS:
        tl.store(VISITS + pid_bh.to(tl.int64) * L + pid_m, visits)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, VIS, CNT, H, L, D, HAS_KEEP: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) of the visible rows (hidden rows' delta is never read)."""
    pid_bh = tl.program_id(0)  # B*H on axis 0: axis 1 is capped at 65535 programs
    pid_m = tl.program_id(1)
    b = pid_bh // H
    n_vis = _n_visible(CNT, b, L, HAS_KEEP)
    tok, vis, off, mask = _block_rows(VIS, b, pid_bh.to(tl.int64) * L * D, pid_m * BLOCK_M, L, D, n_vis,
                                      BLOCK_M, BLOCK_D, HAS_KEEP)
    o, do = _load_pair(O, DO, off, mask, True)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + tok, tl.sum(o * do, 1), mask=vis)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, VIS, b, base, row_base, start_n, L, D, n_vis, sm_scale, qk_scale,
              HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of packed key block ``start_n`` over the visible query blocks; blocks visited."""
    tok_n, n_vis_k, n_off, n_mask = _block_rows(VIS, b, base, start_n, L, D, n_vis, BLOCK_N, BLOCK_D, HAS_KEEP)
    k, v = _load_pair(K, V, n_off, n_mask, DOT_F32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    visits = tl.full([], 0, tl.int32)
    for start_m in range(0, n_vis, BLOCK_M):
        tok_m, m_vis, m_off, m_mask = _block_rows(VIS, b, base, start_m, L, D, n_vis, BLOCK_M, BLOCK_D, HAS_KEEP)
        q, do = _load_pair(Q, DO, m_off, m_mask, DOT_F32)
        lse2, delta = _query_stats(LSE, DELTA, row_base, tok_m, m_vis)
        p = _probs(q, k, lse2, m_vis[:, None] & n_vis_k[None, :], qk_scale, PRECISION)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        ds = _dscores(p, do, v, delta, PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        visits += 1
    return dk * sm_scale, dv, visits


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, VIS, b, base, row_base, start_m, L, D, n_vis, sm_scale, qk_scale,
            HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq of packed query block ``start_m`` over the visible key blocks; blocks visited."""
    tok_m, m_vis, m_off, m_mask = _block_rows(VIS, b, base, start_m, L, D, n_vis, BLOCK_M, BLOCK_D, HAS_KEEP)
    q, do = _load_pair(Q, DO, m_off, m_mask, DOT_F32)
    lse2, delta = _query_stats(LSE, DELTA, row_base, tok_m, m_vis)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visits = tl.full([], 0, tl.int32)
    for start_n in range(0, n_vis, BLOCK_N):
        tok_n, n_vis_k, kv_off, kv_mask = _block_rows(VIS, b, base, start_n, L, D, n_vis, BLOCK_N, BLOCK_D,
                                                      HAS_KEEP)
        k, v = _load_pair(K, V, kv_off, kv_mask, DOT_F32)
        p = _probs(q, k, lse2, m_vis[:, None] & n_vis_k[None, :], qk_scale, PRECISION)
        ds = _dscores(p, do, v, delta, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        visits += 1
    return tl.where(m_vis[:, None], dq * sm_scale, 0.0), visits


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, VIS, CNT, DO, LSE, DELTA, DQ, DK, DV, VISITS,
    H, L, D, sm_scale, qk_scale,  # qk_scale = sm_scale * log2(e)
    HAS_KEEP: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid_bh // H
    base = pid_bh.to(tl.int64) * L * D
    row_base = pid_bh.to(tl.int64) * L
    n_vis = _n_visible(CNT, b, L, HAS_KEEP)

    # ---- dk, dv for packed key block `pid` -----------------------------------------
    start_n = pid * BLOCK_N
    if HAS_KEEP:
        if start_n < n_vis:
            dk, dv, visits_kv = _bwd_dkdv(Q, K, V, DO, LSE, DELTA, VIS, b, base, row_base, start_n, L, D, n_vis,
                                          sm_scale, qk_scale, HAS_KEEP, DOT_F32, PRECISION, BLOCK_D, BLOCK_M,
                                          BLOCK_N)
        else:  # hidden tokens only: zero gradients, nothing read
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            visits_kv = tl.full([], 0, tl.int32)
    else:
        dk, dv, visits_kv = _bwd_dkdv(Q, K, V, DO, LSE, DELTA, VIS, b, base, row_base, start_n, L, D, n_vis,
                                      sm_scale, qk_scale, HAS_KEEP, DOT_F32, PRECISION, BLOCK_D, BLOCK_M, BLOCK_N)
    _store_rows(VIS, b, base, start_n, L, D, DK, dk, BLOCK_N, BLOCK_D, HAS_KEEP)
    _store_rows(VIS, b, base, start_n, L, D, DV, dv, BLOCK_N, BLOCK_D, HAS_KEEP)

    # ---- dq for packed query block `pid` -------------------------------------------
    start_m = pid * BLOCK_M
    if HAS_KEEP:
        if start_m < n_vis:
            dq, visits_q = _bwd_dq(Q, K, V, DO, LSE, DELTA, VIS, b, base, row_base, start_m, L, D, n_vis,
                                   sm_scale, qk_scale, HAS_KEEP, DOT_F32, PRECISION, BLOCK_D, BLOCK_M, BLOCK_N)
        else:
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            visits_q = tl.full([], 0, tl.int32)
    else:
        dq, visits_q = _bwd_dq(Q, K, V, DO, LSE, DELTA, VIS, b, base, row_base, start_m, L, D, n_vis,
                               sm_scale, qk_scale, HAS_KEEP, DOT_F32, PRECISION, BLOCK_D, BLOCK_M, BLOCK_N)
    _store_rows(VIS, b, base, start_m, L, D, DQ, dq, BLOCK_M, BLOCK_D, HAS_KEEP)
    if COUNT_VISITS:
        n_prog = tl.num_programs(0).to(tl.int64) * L
        tl.store(VISITS + pid_bh.to(tl.int64) * L + pid, visits_kv)
        tl.store(VISITS + n_prog + pid_bh.to(tl.int64) * L + pid, visits_q)


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


_INDEX_BLOCK = 1024  # mask elements per step of the index build (one step up to L = 1024)


def visible_index(keep: torch.Tensor):
    """(vis int32 [B, L], count int32 [B]) of a bool keep mask [B, L], built on its device with
    one launch and no host sync: vis[b] lists sample b's visible token indices ascending, then
    its hidden ones ascending (= torch.sort(~keep, dim=1, stable=True).indices); count[b] =
    keep[b].sum()."""
    b, length = keep.shape
    keep_u8 = keep.contiguous().view(torch.uint8)
    vis = torch.empty((b, length), dtype=torch.int32, device=keep.device)
    count = torch.empty((b,), dtype=torch.int32, device=keep.device)
    if b > 0 and length > 0:
        block = min(_INDEX_BLOCK, max(16, triton.next_power_of_2(length)))
        _visible_index_kernel[(b,)](keep_u8, vis, count, length, BLOCK_L=block)
    return vis, count


def _index_args(keep, q):
    """(vis, count, HAS_KEEP): dummy pointers, never read, without a mask."""
    if keep is None:
        return q, q, False
    vis, count = visible_index(keep)
    return vis, count, True


def _check_out(buf, name, shape, dtype, device):
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {list(shape)} on {device}")
    return buf


def attn_fwd(q, k, v, keep=None, scale=None, *, out=None, lse=None, visits=None):
    """Forward launcher: returns (out [B, H, L, D] in q.dtype, lse [B, H, L] fp32).

    ``out`` / ``lse`` are private (tests): preallocated contiguous buffers to write into.
    ``visits`` is private (tests): an int32 [B, H, L] buffer; when given, the program of
    packed query block i of head (b, h) stores at [b, h, i] how many key blocks it visited
    (entries i >= cdiv(L, BLOCK_M) are left as they are).
    """
    b, h, length, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q head dim D={d} exceeds the Triton kernel's maximum {MAX_HEAD_DIM}")
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = _check_out(out, "out", q.shape, q.dtype, q.device)
    lse = _check_out(lse, "lse", (b, h, length), torch.float32, q.device)
    count_visits = visits is not None
    if count_visits:
        visits = _check_out(visits, "visits", (b, h, length), torch.int32, q.device)
    vis, count, has_keep = _index_args(keep, q)
    block_d = _block_d(d)
    dot_f32 = _INTERPRET or q.dtype == torch.float32

    def grid(meta):
        return (b * h, triton.cdiv(length, meta["BLOCK_M"]))

    _attn_fwd_kernel[grid](
        q, k, v, vis, count, out, lse, visits if count_visits else lse, h, length, d, scale * _LOG2E,
        HAS_KEEP=has_keep, DOT_F32=dot_f32, PRECISION=_precision(q.dtype), COUNT_VISITS=count_visits,
        BLOCK_D=block_d,
    )
    return out, lse


def _bwd_block(d: int) -> int:
    if _INTERPRET:
        return 64
    return 64 if d <= 64 else 32


def attn_bwd(do, q, k, v, keep, out, lse, scale=None, *, dq=None, dk=None, dv=None, visits=None):
    """Backward launcher: returns (dq, dk, dv) in q.dtype. ``dq/dk/dv`` are private (tests).

    ``visits`` is private (tests): an int32 [2, B, H, L] buffer; when given, the program of
    block i of head (b, h) stores at [0, b, h, i] how many query blocks its dk/dv loop visited
    and at [1, b, h, i] how many key blocks its dq loop visited.
    """
    b, h, length, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q head dim D={d} exceeds the Triton kernel's maximum {MAX_HEAD_DIM}")
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    do, out, lse = do.contiguous(), out.contiguous(), lse.contiguous()
    dq = _check_out(dq, "dq", q.shape, q.dtype, q.device)
    dk = _check_out(dk, "dk", q.shape, q.dtype, q.device)
    dv = _check_out(dv, "dv", q.shape, q.dtype, q.device)
    count_visits = visits is not None
    if count_visits:
        visits = _check_out(visits, "visits", (2, b, h, length), torch.int32, q.device)
    vis, count, has_keep = _index_args(keep, q)
    block_d = _block_d(d)
    delta = torch.empty((b, h, length), dtype=torch.float32, device=q.device)
    pre_block = 64
    _attn_bwd_preprocess_kernel[(b * h, triton.cdiv(length, pre_block))](
        out, do, delta, vis, count, h, length, d, HAS_KEEP=has_keep, BLOCK_M=pre_block, BLOCK_D=block_d,
    )
    blk = _bwd_block(d)
    _attn_bwd_kernel[(b * h, triton.cdiv(length, blk))](
        q, k, v, vis, count, do, lse, delta, dq, dk, dv, visits if count_visits else lse,
        h, length, d, scale, scale * _LOG2E,
        HAS_KEEP=has_keep, DOT_F32=_INTERPRET or q.dtype == torch.float32,
        PRECISION=_precision(q.dtype), COUNT_VISITS=count_visits, BLOCK_D=block_d, BLOCK_M=blk, BLOCK_N=blk,
        num_warps=4, num_stages=1 if _INTERPRET else 2,
    )
    return dq, dk, dv


__all__ = ["attn_fwd", "attn_bwd", "visible_index", "MAX_HEAD_DIM", "_visible_index_kernel", "_attn_fwd_kernel",
           "_attn_bwd_preprocess_kernel", "_attn_bwd_kernel"]
