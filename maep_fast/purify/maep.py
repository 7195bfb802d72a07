"""MAEP purification: one forward pass of a masked autoencoder at mask ratio 0.

``Purifier`` wraps a MaskedAutoencoderViT trained to output clean pixels
(norm_pix_loss=False). ``forward`` is differentiable (adaptive attacks);
``purify`` runs without gradients in bounded-memory chunks. Images larger than
the model's input are purified tile by tile with overlap blending.

Precision (``precision=``, also on ``MAEPure``):

=========  ================================================================
``fp32``   the model's own weights, no autocast (an autocast region of the
           caller is switched off)
``bf16``   a bfloat16 copy of the model (see below); CPU supports it too
``fp16``   a float16 copy of the model
``auto``   the caller's autocast dtype if an autocast region is open on the
           input's device (``with torch.autocast("cuda", torch.bfloat16):
           pur.purify(x)``), else ``AUTO_PRECISION[device type]``
=========  ================================================================

``AUTO_PRECISION`` is fp32 on the CPU and on CUDA. bf16 moves a trained
purifier's outputs by bf16 rounding only (tests/test_precision.py bounds the
prediction flips of a small classifier on purified digits), but the CUDA
default changes only on a GPU measurement of the demo's evaluation rows under
both precisions (``bench/precision_demo.py`` writes it); switching is the one
``AUTO_PRECISION["cuda"]`` entry. Ask for ``precision="bf16"`` to get it now.

How bf16 / fp16 run (``cast_weights=True``, the default): the model's
parameters and floating buffers are cast to the compute dtype once, into a
cached copy of the model (``compute_model``), and the copy runs with autocast
off. So no weight is re-cast per call (autocast casts every weight on every
call: a full read of the fp32 weights and a write of the copy, per forward),
and the whole network -- residual stream, LayerNorm, attention, MLP -- stays
in the compute dtype (under autocast LayerNorm returns fp32 and the residual
stream would be fp32). The input is cast to the compute dtype; the output is
clamped in fp32 and returned in the input's dtype. The copy holds
``1 / 2`` of the fp32 weights' memory on top of them.

The copy follows the model: before each call the parameters' versions (bumped
by every in-place write: optimizer steps, ``load_state_dict``, ``nn.init``)
and storages are compared with the copy's source, and changed weights are cast
into the copy in place (its storages stay put, so compiled functions and
CUDA graphs that read them stay valid). A change of the attention switches or
the backend rebuilds the copy. Writes that bypass the version counter
(``param.data.copy_(...)``) are not seen: call ``refresh_weights()`` after
them. ``cast_weights=False`` runs the fp32 model under ``torch.autocast``
instead (no extra memory; weights re-cast per call; fp32 residual stream).
fp16 keeps the residual stream in fp16: a model whose activations exceed
65504 overflows there; prefer bf16.

Fusions: in eager mode each Linear's bias, GELU, the residual add and the
LayerNorm are separate kernels. ``compile=True`` (torch.compile/inductor)
fuses these epilogues, and the elementwise ops between GEMMs, into the
neighbouring kernels; there is no hand-written fused kernel for them.

Input checks: ``purify(x)`` checks the pixel values (finite, in [0, 1]) of
its input. Reading a device value back synchronizes the host with the GPU,
so on CUDA the check synchronizes only on the first call for each
(shape, dtype, device); later calls with a known key compute the check on
the device and copy its flag to pinned host memory without waiting, and a
later call raises ``ValueError`` for it once the flag has arrived
(``check_pending(wait=True)`` waits for and raises every outstanding flag).
The steady state of a purification loop therefore never synchronizes. On the
CPU every call is checked at once. ``validate=False`` skips the value checks
(inputs the caller has checked, e.g. inside an attack loop); shape, dtype and
device checks always run (they read no device values).

torch.compile (``compile=True``, or a torch.compile mode string): ``purify``
(the no-grad path; ``forward`` stays eager for autograd) runs the model's
fused path -- attention by SDPA or the ``maep_fast::`` custom ops, which
carry fake kernels, so inductor traces it whole (``fullgraph=True``: a graph
break is an error, not a silent fallback) -- compiled lazily on the first
call and cached per (image shape, input dtype, device, compute dtype, mode,
compute model).

- Mode rule for ``compile=True``: on CUDA, chunks of at most
  ``CUDA_GRAPH_MAX_BATCH`` (128) images use ``mode="reduce-overhead"`` (CUDA
  graphs replay the launches of a small chunk, whose host cost would
  otherwise exceed its kernels' time); larger chunks, where the kernels
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

import copy
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


def compute_context(model: nn.Module, device: torch.device, dtype: torch.dtype):
    """The region ``model`` runs in for compute dtype ``dtype``: autocast off when the model already
    holds its weights in ``dtype`` (a cast copy, or fp32 / fp64), else ``model_autocast``."""
    if _float_dtype(model) == dtype or dtype not in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, enabled=False)
    return model_autocast(device, dtype)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _first_weight(model: nn.Module) -> torch.Tensor:
    """The model's first floating parameter (MAE: the patch embedding's weight)."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None:
        return pe.proj.weight
    return next(p for p in model.parameters() if p.is_floating_point())


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter."""
    return _first_weight(model).dtype


class CastModelCache:
    """Copies of ``model`` with floating parameters and buffers cast to a compute dtype, made once
    and kept in step with the model's weights (module docstring of ``maep_fast.purify.maep``).

    ``get(dtype)`` returns the model itself for fp32/fp64 or when its weights already are in
    ``dtype``; else the cached copy for (dtype, attention settings). Each ``get`` compares the
    version counter and storage of every source tensor with what the copy was cast from and
    re-casts the changed ones in place (the copy's storages never move). The list of source
    tensors is taken when the copy is built: after replacing a parameter object (assignment,
    ``load_state_dict(assign=True)``) or a write that bypasses the version counter
    (``param.data.copy_``), call ``invalidate()``. The copy's parameters never require grad
    (gradients reach the input, not the copy); its train/eval mode follows the model.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._attns = [b.attn for b in list(getattr(model, "blocks", ())) + list(getattr(model, "decoder_blocks", ()))]
        # (dtype, settings) -> [copy, source tensors, dest tensors, signature, first weight, its device]
        self._copies: dict = {}
        self._stale = False

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]

    @staticmethod
    def _signature(tensors: list[torch.Tensor]) -> list:
        return [(t._version, t.data_ptr()) for t in tensors]

    def _settings(self) -> tuple:
        m = self.model
        return (getattr(m, "ops_backend", None), getattr(m, "norm_pix_loss", None),
                tuple((a.fused_attn, a.backend) for a in self._attns))

    def _build(self, dtype: torch.dtype, src: list[torch.Tensor]) -> list:
        m = self.model
        memo: dict = {}
        for mod in m.modules():  # cast while copying: never a second fp32 copy of the weights
            for p in mod._parameters.values():
                if p is not None and p.is_floating_point() and id(p) not in memo:
                    memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            for b in mod._buffers.values():
                if b is not None and b.is_floating_point() and id(b) not in memo:
                    memo[id(b)] = b.detach().to(dtype)
        # per-call state of the source (attention maps of an AMV run) is not copied
        saved = [(a, a.last_attn) for a in self._attns if getattr(a, "last_attn", None) is not None]
        for a, _ in saved:
            a.last_attn = None
        try:
            cp = copy.deepcopy(m, memo)
        finally:
            for a, la in saved:
                a.last_attn = la
        cp.requires_grad_(False)
        w = _first_weight(m)
        return [cp, src, self._tensors(cp), self._signature(src), w, w.device]

    def _refresh(self, entry: list, src: list[torch.Tensor], sig: list) -> None:
        with torch.no_grad():
            for s_new, d, old, new in zip(src, entry[2], entry[3], sig):
                if old != new:
                    d.copy_(s_new.detach())
        entry[1], entry[3] = src, sig

    def get(self, dtype: torch.dtype) -> nn.Module:
        m = self.model
        if dtype not in (torch.float16, torch.bfloat16) or _float_dtype(m) == dtype:
            return m
        if self._stale:  # re-take the source tensors of every copy and re-cast all of them
            self._stale = False
            src = self._tensors(m)
            for key, entry in list(self._copies.items()):
                if len(entry[2]) != len(src) or any(a.shape != b.shape for a, b in zip(entry[2], src)):
                    del self._copies[key]
                else:
                    self._refresh(entry, src, [None] * len(src))
                    entry[3] = self._signature(src)
        key = (dtype, self._settings())  # one copy per setting (MAE-Pure's exact_graph toggles fused attention)
        entry = self._copies.get(key)
        w = _first_weight(m)
        if entry is not None and (entry[4] is not w or w.device != entry[5]):
            entry = None  # the model moved (``.to`` replaced or re-placed its parameters): cast it again
        if entry is None:
            entry = self._copies[key] = self._build(dtype, self._tensors(m))
        else:
            sig = self._signature(entry[1])
            if sig != entry[3]:
                self._refresh(entry, entry[1], sig)
        cp = entry[0]
        if cp.training != m.training:
            cp.train(m.training)
        return cp

    def invalidate(self) -> None:
        """Re-take the model's tensors and re-cast all of them on the next ``get`` (in place when
        the shapes still match, else the copy is rebuilt)."""
        self._stale = True

    def clear(self) -> None:
        """Drop the copies (their memory)."""
        self._copies.clear()


class CastWeights:
    """What a purifier needs to run its MAE ``self.model`` in a low-precision compute dtype from a
    copy cast once (``CastModelCache``). The purifier sets ``model``, ``precision``, ``cast_weights``
    (bool) and ``_casts = CastModelCache(model)`` in its ``__init__``."""

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the MAE runs in for an input on ``device`` now (see ``precision``)."""
        return resolve_precision(self.precision, device)

    def compute_model(self, cdtype: torch.dtype) -> MaskedAutoencoderViT:
        """The MAE that runs for compute dtype ``cdtype``: the cached cast copy for bf16/fp16
        (``cast_weights``; kept in step with the MAE's weights), else the MAE itself."""
        if not self.cast_weights:
            return self.model
        if self._casts.model is not self.model:  # the model was replaced
            self._casts = CastModelCache(self.model)
        return self._casts.get(cdtype)

    def refresh_weights(self) -> None:
        """Re-cast the cached low-precision copy from the MAE's weights on the next call (needed
        only after writes that bypass the version counter, e.g. ``param.data.copy_``)."""
        self._casts.invalidate()


class PixelGuard:
    """Value checks of purifier inputs (finite, in [0, 1]) without a host sync in the steady state.

    CPU inputs are checked at once (``check_pixels``). A CUDA input is checked synchronously the
    first time its (shape, dtype, device) is seen; later inputs of a known key get a device-side
    check whose flag is copied to pinned host memory without waiting, and ``check_pending`` (run at
    the start of every later call) raises ``ValueError`` for a flag that has arrived and is set.
    ``async_devices`` (device types) says where the deferred check applies (tests put "cpu" in it).
    """

    def __init__(self, async_devices: tuple[str, ...] = ("cuda",)):
        self.async_devices = async_devices
        self._seen: set = set()
        self._pending: list = []  # (host flag, event or None, description)

    def __call__(self, x: torch.Tensor, name: str = "x") -> None:
        self.check_pending(name)
        key = (tuple(x.shape), x.dtype, x.device)
        if x.device.type not in self.async_devices or key not in self._seen:
            check_pixels(x, name)
            self._seen.add(key)
            return
        xd = x.detach()
        mn, mx = torch.aminmax(xd)
        bad = (~torch.isfinite(xd)).any() | (mn < -1e-6) | (mx > 1 + 1e-6)
        if x.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        else:
            host, ev = bad, None
        self._pending.append((host, ev, f"{name} of shape {tuple(x.shape)}"))

    def check_pending(self, name: str = "x", wait: bool = False) -> None:
        """Raise ``ValueError`` for a deferred check that found NaN/Inf or a pixel outside [0, 1]
        (``wait``: wait for every outstanding check first; otherwise never blocks)."""
        keep = []
        for host, ev, what in self._pending:
            if ev is not None and not wait and not ev.query():
                keep.append((host, ev, what))
                continue
            if ev is not None:
                ev.synchronize()
            if bool(host):
                self._pending = []
                raise ValueError(f"{name}: an earlier input ({what}) contained NaN/Inf or pixel values outside "
                                 "[0, 1] (found by the asynchronous check; its output is invalid)")
        self._pending = keep

    def reset(self) -> None:
        self._seen.clear()
        self._pending = []


class Purifier(CastWeights, nn.Module):
    """x [N, C, H, W] in [0, 1] -> purified [N, C, H, W] in [0, 1] (H, W >= img_size).

    ``precision``: "auto" (default) | "fp32" | "bf16" | "fp16" (module docstring; "auto" is fp32
    unless the caller has an autocast region open). ``cast_weights`` (default True): bf16/fp16 run a
    cached copy of the model cast once to that dtype, residual stream included; False: the fp32
    model under autocast. ``compile``: False (eager), True (torch.compile with the mode rule of the
    module docstring) or a torch.compile mode string; it applies to ``purify`` only.
    """

    def __init__(self, model: MaskedAutoencoderViT, batch_size: int = 256, tile_overlap: int | None = None,
                 fused: bool = True, compile: bool | str = False, precision: str = DEFAULT_PRECISION,
                 cast_weights: bool = True):
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
        if not isinstance(cast_weights, bool):
            raise TypeError(f"cast_weights must be a bool, got {type(cast_weights).__name__}")
        self.cast_weights = cast_weights
        self._casts = CastModelCache(self.model)
        self._guard = PixelGuard()
        self.compile = compile
        self.compile_backend = "inductor"  # torch.compile backend (tests swap in a counting one)
        self._compiled: dict = {}  # (C, H, W, input dtype, device, compute dtype, mode) -> compiled fn

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu", **kwargs) -> "Purifier":
        return cls(load_model(path, expect_kind="mae", map_location=map_location), **kwargs)

    @property
    def img_size(self) -> int:
        return self.model.img_size

    def _model_dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def check_pending(self, wait: bool = True) -> None:
        """Raise ``ValueError`` if a deferred (asynchronous) pixel check of an earlier CUDA input
        failed; ``wait=True`` waits for the outstanding checks (one synchronization)."""
        self._guard.check_pending("x", wait=wait)

    def _single(self, x: torch.Tensor, cdtype: torch.dtype | None = None,
                model: MaskedAutoencoderViT | None = None) -> torch.Tensor:
        """One model-sized batch: cast to the compute model's dtype, run it (autocast off for a
        cast copy, the precision's autocast otherwise), clamp in fp32, return in x's dtype."""
        if cdtype is None:
            cdtype = self.compute_dtype(x.device)
        if model is None:
            model = self.compute_model(cdtype)
        xm = x.to(_float_dtype(model))
        with compute_context(model, x.device, cdtype):
            y = model.reconstruct(xm, mask_ratio=0.0)
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
        model = self.compute_model(cdt)
        fn = lambda t: self._single(t, cdt, model)  # noqa: E731
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

    def _compiled_fn(self, x: torch.Tensor, cdtype: torch.dtype, mode: str, model: MaskedAutoencoderViT):
        key = (tuple(x.shape[1:]), x.dtype, x.device, cdtype, mode, id(model))
        fn = self._compiled.get(key)
        if fn is None:
            single = self._single

            def run(t: torch.Tensor) -> torch.Tensor:
                return single(t, cdtype, model)

            # dynamo keeps its cache, and counts its recompile limit (8), per code object: a code object
            # of its own per purifier and key, so that many purifiers / dtypes / modes in one process
            # never push each other past the limit (where dynamo silently falls back to eager)
            run = types.FunctionType(run.__code__.replace(co_name=f"maep_purify_{next(_KEYS)}"), run.__globals__,
                                     run.__name__, run.__defaults__, run.__closure__)
            opts = {} if mode == "default" else {"mode": mode}
            fn = torch.compile(run, fullgraph=True, dynamic=False, backend=self.compile_backend, **opts)
            self._compiled[key] = fn
        return fn

    def _run_compiled(self, x: torch.Tensor, cdtype: torch.dtype, model: MaskedAutoencoderViT) -> torch.Tensor:
        """One chunk of model-sized images through the compiled path (padded, copied out)."""
        n = x.shape[0]
        mode = self.compile_mode(x.device, n)
        nb = self.padded_batch(n, mode, x.device)
        xp = x if nb == n else torch.cat([x, x.new_zeros((nb - n, *x.shape[1:]))])
        xp = xp.contiguous()
        torch._dynamo.maybe_mark_dynamic(xp, 0)
        fn = self._compiled_fn(xp, cdtype, mode, model)
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

        ``validate`` (default True) checks the pixel values (finite, in [0, 1]): on CUDA with one
        host sync the first time an input's (shape, dtype, device) is seen and asynchronously after
        that (module docstring), on the CPU at once. ``validate=False`` skips the value checks for
        inputs checked already (metadata checks still run); then nothing here waits for a CUDA
        device. With ``compile`` the chunks run the compiled path."""
        self._check(x)
        if validate:
            self._guard(x, "x")
        cdt = self.compute_dtype(x.device)
        model = self.compute_model(cdt)
        if self.compile:
            single = lambda t: self._run_compiled(t, cdt, model)  # noqa: E731
        else:
            single = lambda t: self._single(t, cdt, model)  # noqa: E731
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
