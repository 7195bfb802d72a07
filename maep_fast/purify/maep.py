"""MAEP purification: one forward pass of a masked autoencoder at mask ratio 0.

``Purifier`` wraps a MaskedAutoencoderViT trained to output clean pixels
(norm_pix_loss=False). ``forward`` is differentiable (adaptive attacks);
``purify`` runs without gradients in bounded-memory chunks. Images larger than
the model's input are purified tile by tile with overlap blending.

Precision (``precision=``, also on ``MAEPure``): the model runs under
``torch.autocast`` in the chosen dtype; inputs are cast to the model's dtype
first, the output is clamped in fp32 and returned in the input's dtype.

=========  ================================================================
``fp32``   no autocast (an autocast region of the caller is switched off)
``bf16``   autocast bfloat16 (CUDA; CPU autocast supports it too)
``fp16``   autocast float16
``auto``   the caller's autocast if one is active on the input's device
           (e.g. ``with torch.autocast("cuda", torch.bfloat16): pur.purify(x)``),
           else ``AUTO_PRECISION[device type]``: fp32 on the CPU, and fp32 on
           CUDA too for now -- see below
=========  ================================================================

The default is ``"auto"``, and ``"auto"`` is fp32 on CUDA too, for now. Issue
14 asks for bf16 as the CUDA default if that moves the demo's robust
accuracies by at most 1 point. Only a CPU stand-in was measured (CPU bf16
autocast; no GPU in that session): on the 360 embedded test digits, clean and
PGD-10 adversarial (eps 32/255), bf16 MAEP purification changed a small
classifier's prediction on 0 % and 0.28 % of the images (1 of 360; MAE-Pure
S = 6: 0.83 %), so accuracies moved by at most 0.3 point; tested in
tests/test_precision.py (<= 1 %). And once on the demo itself (its MAEP
trained as ``python3 -m maep_fast demo`` does, seed 0, evaluated with CPU bf16
autocast against fp32): clean 95.83 / 95.83 %, oblivious PGD-20 44.17 /
45.00 %, adaptive full-gradient PGD-20 8.61 / 8.61 %; MAE-Pure demo rows
(64 images, clean / oblivious) 95.31 / 12.50 % in both. So at most 0.83 point,
on the CPU. That does not settle the GPU: its bf16
kernels (cuBLAS, SDPA flash attention) round and accumulate differently from
the CPU's, GPU tests written against fp32 purification
(tests/test_gpu_backends.py) and the benchmark's fp32 rows rely on the fp32
default, and the criterion is the demo's own rows. So
``AUTO_PRECISION["cuda"]`` stays ``"fp32"`` until a GPU run measures the demo's
rows under ``precision="bf16"``; switching is that one entry. Ask for
``precision="bf16"`` to get bf16 now.

torch.compile (``compile=True``, or a torch.compile mode string): ``purify``
(the no-grad path; ``forward`` stays eager for autograd) runs the model's
fused path -- attention by SDPA or the ``maep_fast::`` custom ops, which
carry fake kernels, so inductor traces it whole (``fullgraph=True``: a graph
break is an error, not a silent fallback) -- compiled lazily on the first
call and cached per (image shape, input dtype, device, compute dtype, mode).

- Mode rule for ``compile=True``: on CUDA, chunks of at most
  ``CUDA_GRAPH_MAX_BATCH`` (128) images use ``mode="reduce-overhead"`` (CUDA
  graphs: the launch and host cost that made the fused path slower than eager
  at B128 on the H200 is replayed away); larger chunks, where the kernels
  dominate, and every other device use the default mode. A mode string
  (``compile="max-autotune"``, ``"default"``, ...) is used as given.
- Batch sizes: the batch dimension is marked dynamic
  (``torch._dynamo.maybe_mark_dynamic``), so chunks of different sizes
  (a ragged last chunk, calls with other N) reuse one compiled graph instead
  of recompiling per size until dynamo's recompile limit turns compilation
  off. A chunk of one image is padded to two (dynamo specializes size 1:
  it would otherwise cost a second compile). Under CUDA graphs every new
  size still records a new graph, so there chunks are also zero-padded up to
  the next power of two (capped at ``batch_size``): at most
  log2(batch_size) + 1 recordings, at most 2x work on the one padded chunk.
  Padding is exact: MAEP at mask ratio 0 treats every image independently.
- CUDA-graph outputs are overwritten by the next replay: each chunk's result
  is copied out into the returned tensor at once.
"""
from __future__ import annotations

import itertools
import types
from pathlib import Path

import torch
import torch.nn as nn

from maep_fast._checks import check_pixels, check_tensor
from maep_fast.checkpoint import load_model
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.purify.tiling import tiled_apply

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what "auto" means without an active autocast of the caller, per device type (see the module docstring)
AUTO_PRECISION = {"cuda": "fp32", "cpu": "fp32"}
DEFAULT_PRECISION = "auto"
CUDA_GRAPH_MAX_BATCH = 128
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_KEYS = itertools.count()


def check_precision(precision: object) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the model computes in for ``precision`` on ``device`` (read at call time: "auto"
    follows an autocast region the caller has open on that device type)."""
    if precision == "auto":
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        precision = AUTO_PRECISION.get(device.type, "fp32")
    return _DTYPES[precision]


def model_autocast(device: torch.device, dtype: torch.dtype):
    """The model's precision context: autocast in ``dtype``, or autocast off for fp32/fp64.
    ``cache_enabled=False``: the weight-cast cache must be off inside CUDA-graph capture, and one
    forward per region gains nothing from it."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)
    return torch.autocast(device.type, enabled=False)


def fp32_region(device: torch.device):
    """Statistics, loss reductions and PGD steps: outside any autocast."""
    return torch.autocast(device.type, enabled=False)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Purifier(nn.Module):
    """x [N, C, H, W] in [0, 1] -> purified [N, C, H, W] in [0, 1] (H, W >= img_size).

    ``precision``: "auto" (default) | "fp32" | "bf16" | "fp16" (module docstring; "auto" is fp32
    unless the caller has an autocast region open). ``compile``: False (eager), True (torch.compile
    with the mode rule of the module docstring) or a torch.compile mode string; it applies to
    ``purify`` only.
    """

    def __init__(self, model: MaskedAutoencoderViT, batch_size: int = 256, tile_overlap: int | None = None,
                 fused: bool = True, compile: bool | str = False, precision: str = DEFAULT_PRECISION):
        super().__init__()
        if not isinstance(model, MaskedAutoencoderViT):
            raise TypeError(f"model must be a MaskedAutoencoderViT, got {type(model).__name__}")
        if model.norm_pix_loss:
            raise ValueError("model predicts per-patch normalized pixels (norm_pix_loss=True) and cannot output images; "
                             "MAEP purifiers are trained with norm_pix_loss=False")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (isinstance(compile, bool) or compile in COMPILE_MODES):
            raise ValueError(f"compile must be a bool or one of {COMPILE_MODES}, got {compile!r}")
        # fused=False runs the pure-PyTorch reference path for every op (sets the model's backend)
        self.model = model.set_backend("auto" if fused else "torch").eval()
        self.batch_size = batch_size
        t = model.img_size
        self.tile_overlap = t // 4 if tile_overlap is None else tile_overlap
        if not 0 <= self.tile_overlap < t:
            raise ValueError(f"tile_overlap must be in [0, {t}), got {self.tile_overlap}")
        self.precision = check_precision(precision)
        self.compile = compile
        self.compile_backend = "inductor"  # torch.compile backend (tests swap in a counting one)
        self._compiled: dict = {}  # (C, H, W, input dtype, device, compute dtype, mode) -> compiled fn

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu", **kwargs) -> "Purifier":
        return cls(load_model(path, expect_kind="mae", map_location=map_location), **kwargs)

    @property
    def img_size(self) -> int:
        return self.model.img_size

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the model runs in for an input on ``device`` now (see ``precision``)."""
        return resolve_precision(self.precision, device)

    def _model_dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def _single(self, x: torch.Tensor, cdtype: torch.dtype | None = None) -> torch.Tensor:
        """One model-sized batch: cast to the model's dtype, run under the precision's autocast,
        clamp in fp32, return in x's dtype."""
        if cdtype is None:
            cdtype = self.compute_dtype(x.device)
        xm = x.to(self._model_dtype())
        with model_autocast(x.device, cdtype):
            y = self.model.reconstruct(xm, mask_ratio=0.0)
        return y.float().clamp(0.0, 1.0).to(x.dtype)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        """Metadata checks (no host sync): rank, dtype, device, channels, size."""
        check_tensor(x, "x", ndim=4)
        dev = next(self.model.parameters()).device
        if x.device != dev:
            raise ValueError(f"x is on {x.device} but the purifier is on {dev}")
        if x.shape[1] != self.model.in_chans:
            raise ValueError(f"x must have {self.model.in_chans} channel(s) (shape [N, {self.model.in_chans}, H, W]), "
                             f"got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h < self.img_size or w < self.img_size:
            raise ValueError(f"x must be at least {self.img_size}x{self.img_size} pixels for this purifier, got {h}x{w}")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable purification (no chunking, never compiled). Metadata checks only: an attack
        calls this at every step, and its entry point has checked the pixels once (``pgd_attack``)."""
        self._check(x)
        cdt = self.compute_dtype(x.device)
        fn = lambda t: self._single(t, cdt)  # noqa: E731
        if x.shape[-2:] == (self.img_size, self.img_size):
            return fn(x)
        return tiled_apply(fn, x, self.img_size, self.tile_overlap, max_batch=self.batch_size)

    # ------------------------------------------------------------ torch.compile
    def compile_mode(self, device: torch.device, n: int) -> str:
        """The torch.compile mode for a chunk of ``n`` images (module docstring)."""
        if isinstance(self.compile, str):
            return self.compile
        if device.type == "cuda" and n <= CUDA_GRAPH_MAX_BATCH:
            return "reduce-overhead"
        return "default"

    @staticmethod
    def records_cuda_graphs(mode: str, device: torch.device) -> bool:
        """Whether torch.compile's ``mode`` records CUDA graphs on ``device``."""
        return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")

    def padded_batch(self, n: int, mode: str, device: torch.device) -> int:
        """The batch a chunk of ``n`` images runs at when compiled (module docstring)."""
        if self.records_cuda_graphs(mode, device):
            return max(2, min(_next_pow2(n), max(self.batch_size, n)))
        return max(2, n)

    def _compiled_fn(self, x: torch.Tensor, cdtype: torch.dtype, mode: str):
        key = (tuple(x.shape[1:]), x.dtype, x.device, cdtype, mode)
        fn = self._compiled.get(key)
        if fn is None:
            single = self._single

            def run(t: torch.Tensor) -> torch.Tensor:
                return single(t, cdtype)

            # dynamo keeps its cache, and counts its recompile limit (8), per code object: a code object
            # of its own per purifier and key, so that many purifiers / dtypes / modes in one process
            # never push each other past the limit (where dynamo silently falls back to eager)
            run = types.FunctionType(run.__code__.replace(co_name=f"maep_purify_{next(_KEYS)}"), run.__globals__,
                                     run.__name__, run.__defaults__, run.__closure__)
            opts = {} if mode == "default" else {"mode": mode}
            fn = torch.compile(run, fullgraph=True, dynamic=False, backend=self.compile_backend, **opts)
            self._compiled[key] = fn
        return fn

    def _run_compiled(self, x: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
        """One chunk of model-sized images through the compiled path (padded, copied out)."""
        n = x.shape[0]
        mode = self.compile_mode(x.device, n)
        nb = self.padded_batch(n, mode, x.device)
        xp = x if nb == n else torch.cat([x, x.new_zeros((nb - n, *x.shape[1:]))])
        xp = xp.contiguous()
        torch._dynamo.maybe_mark_dynamic(xp, 0)
        fn = self._compiled_fn(xp, cdtype, mode)
        graphs = self.records_cuda_graphs(mode, x.device)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # inference: each call is a new step
        y = fn(xp)
        if graphs:  # the graph's output buffer is overwritten by the next replay
            return y[:n].clone()
        return y[:n] if nb != n else y

    def reset_compiled(self) -> None:
        """Drop the compiled functions (their dynamo cache entries stay until ``torch._dynamo.reset()``)."""
        self._compiled.clear()

    # ------------------------------------------------------------------ no grad
    @torch.no_grad()
    def purify(self, x: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Purify any number of images in chunks of ``batch_size`` without gradients.

        ``validate`` checks the pixels (finite, in [0, 1]; one host sync) before any work;
        ``validate=False`` skips that for inputs checked already, and then nothing here
        synchronizes with a CUDA device. With ``compile`` the chunks run the compiled path."""
        self._check(x)
        if validate:
            check_pixels(x, "x")
        cdt = self.compute_dtype(x.device)
        if self.compile:
            single = lambda t: self._run_compiled(t, cdt)  # noqa: E731
        else:
            single = lambda t: self._single(t, cdt)  # noqa: E731
        outs = []
        for k in range(0, x.shape[0], self.batch_size):
            chunk = x[k:k + self.batch_size]
            if chunk.shape[-2:] == (self.img_size, self.img_size):
                outs.append(single(chunk))
            else:
                outs.append(tiled_apply(single, chunk, self.img_size, self.tile_overlap, max_batch=self.batch_size))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class PurifiedClassifier(nn.Module):
    """classifier(purifier(x)), differentiable end to end (adaptive attacks)."""

    def __init__(self, purifier: nn.Module, classifier: nn.Module):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purifier(x))
