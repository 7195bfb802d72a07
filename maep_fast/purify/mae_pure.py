"""MAE-Pure: test-time purification by descending the MAE reconstruction loss.

Algorithm 1 of "Semantic-Preserving Adversarial Purification" (NeurIPS 2025
submission; see docs/methods.md): for s = 1..S

    g = sign(grad_x L_rec(x_s))
    x_{s+1} = clip(x_s - lambda * g)   to the eta-ball around the input and to [0, 1]

with L_rec the masked MSE of a masked autoencoder (MAE's forward_loss with the
model's own ``norm_pix_loss``; the mask comes from ``random_masking``), here
averaged over ``n_masks`` fresh random masks per step (the masks are batched:
the batch is repeated ``n_masks`` times in one forward pass).

Defaults and where they come from:

===============  =========  ==================================================
parameter        default    source
===============  =========  ==================================================
steps (S)        150        published (CIFAR-10 / ImageNet, MAE)
step_size        1/255      published ("1", unit presumably 1/255)
halve_step       True       published (step halved after S/2 on CIFAR-10)
mask_ratio       0.25       published (CIFAR-10; ImageNet 0.20)
eta              8/255      NOT published -- our default (L-inf radius)
n_masks          1          NOT published -- our default
early_stop       None       ours (per-sample tolerance on the loss change)
===============  =========  ==================================================

Randomness: with ``seed=None`` every call draws fresh masks from the global
RNG (a *randomized* defense: attack it with EOT). With ``seed=k`` each call
re-seeds a private ``torch.Generator`` so the purifier is a deterministic
function of its input.

Gradients. ``purify(x)`` is the no-grad fast path (in-place fused
``maep_fast.ops.pgd_step_`` with ``direction=-1``). ``forward(x)`` is
differentiable when ``x.requires_grad`` (full-gradient adaptive attacks
differentiate through all S steps; memory grows linearly with S). Because
d sign(g) / dg = 0 almost everywhere, the exact derivative of the S-step loop
only flows through the identity and the clipping; the default
(``exact_graph=False``) therefore keeps the sign direction as a constant in
the outer graph, which gives *the same* gradient as differentiating the inner
gradient with ``create_graph=True`` (``exact_graph=True``, S times more
expensive: it builds the double-backward graph just to multiply it by zero).
Both are provided; a test checks they agree.

CUDA graphs (``cuda_graph=True``). On a GPU the whole purification step --
MAE forward on the masked batch, per-sample reconstruction loss,
``torch.autograd.grad`` w.r.t. the image and the in-place fused
``pgd_step_`` (``direction=-1``) -- is captured once in a CUDA graph and
replayed S times per chunk, which removes the per-step Python and launch
overhead. Only the no-grad ``purify`` path uses it (``forward`` on an input
that requires grad always runs eagerly). The mask noise is *not* drawn inside
the graph: before every replay one ``torch.rand`` of the eager path's shape is
drawn outside it (from the seeded generator, or the global CUDA RNG when
``seed=None``) and copied into a static buffer, so the RNG stream, and hence
the result, is the eager path's for the same seed / RNG state. The per-sample
step size lives in a static tensor refilled before a replay when it changes
(halving after S/2); eta is refilled once per call. Graphs are cached per
chunk shape (batch, C, H, W, compute dtype, device, plus the settings baked
into them), so a ragged last chunk gets its own graph (no padding: padding
would change the shape of the noise draws and break equality with the eager
path). ``reset_cuda_graphs()`` frees them. Not supported: early stop (the
active set shrinks; ``ValueError``), CPU tensors (``ValueError``, never a
silent fallback), a model in training mode (``ValueError``). During warm-up
and capture the MAE's parameters are set to ``requires_grad=False`` (their
gradients are not part of the step) and restored afterwards.

Precision (``precision=``: "auto" | "fp32" | "bf16" | "fp16", as on
``Purifier``; see ``maep_fast.purify.maep``). For bf16/fp16 the MAE's forward
and its backward to the image run in a copy of the MAE cast once to that dtype
(``cast_weights=True``, the default; kept in step with the MAE's weights,
``refresh_weights()`` after writes that bypass the version counter), with
autocast off, so no weight is re-cast per step and the residual stream stays
in the compute dtype; ``cast_weights=False`` runs the MAE under autocast
instead. The reconstruction loss (per-patch statistics and reduction, on the
prediction cast back to the MAE's own dtype), the input gradient it returns,
the iterate, eta-ball and the PGD step stay in fp32 (fp64 for an fp64 MAE),
outside any autocast; the result comes back in the input's dtype. "auto"
(default) follows an autocast region the caller has open, else
``maep.AUTO_PRECISION``. The dtype is resolved once per call and is part of
the CUDA-graph key.

One step as one callable: ``purification_step_`` (masked forward, loss, input
gradient, fused sign step with the eta-ball and [0, 1] clipping) reads only
static buffers, allocates nothing value-dependent and never synchronizes, so
it is what ``cuda_graph=True`` captures and replays, at bf16 as at fp32.

Input checks: ``purify`` checks the pixel values as ``Purifier.purify`` does
(on CUDA synchronously only for a new (shape, dtype, device), asynchronously
after that); ``validate=False`` skips them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from maep_fast._checks import check_tensor
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.ops.patch_recon_loss import patch_recon_loss
from maep_fast.ops._dispatch import resolve_backend
from maep_fast.ops.pgd_step import _pgd_step_inplace_validated, pgd_step, pgd_step_
from maep_fast.purify.maep import (DEFAULT_PRECISION, CastModelCache, CastWeights, PixelGuard, _float_dtype,
                                   check_precision, compute_context, fp32_region)


class MAEPure(CastWeights, nn.Module):
    """x [N, C, H, W] in [0, 1] -> purified x, ||x' - x||_inf <= eta, x' in [0, 1].

    ``cuda_graph`` (default False): for CUDA inputs, ``purify`` captures one
    purification step (forward, loss, input gradient, fused PGD step) in a CUDA
    graph per chunk shape and replays it ``steps`` times; same result as the
    eager path for the same seed (noise is drawn outside the graph, in the
    eager order, and copied in). Incompatible with ``early_stop`` (ValueError);
    CPU inputs raise ValueError. See the module docstring.
    """

    randomized = True  # fresh masks per call (unless seeded): evaluate adaptive attacks with EOT

    def __init__(
        self,
        model: MaskedAutoencoderViT,
        steps: int = 150,
        step_size: float = 1 / 255,
        halve_step: bool = True,
        eta: float = 8 / 255,
        mask_ratio: float = 0.25,
        n_masks: int = 1,
        early_stop: float | None = None,
        seed: int | None = None,
        backend: str = "auto",
        progress: bool = False,
        batch_size: int = 256,
        exact_graph: bool = False,
        fused: bool = True,
        cuda_graph: bool = False,
        precision: str = DEFAULT_PRECISION,
        cast_weights: bool = True,
    ):
        super().__init__()
        if not fused:  # the pure-PyTorch reference path for every op
            backend = "torch"
        if not isinstance(model, MaskedAutoencoderViT):
            raise TypeError(f"model must be a MaskedAutoencoderViT, got {type(model).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        for name, v in (("step_size", step_size), ("eta", eta)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) (the loss is measured on removed patches), got {mask_ratio!r}")
        if int(model.patch_embed.num_patches * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {model.patch_embed.num_patches}")
        if isinstance(n_masks, bool) or not isinstance(n_masks, int) or n_masks < 1:
            raise ValueError(f"n_masks must be a positive int, got {n_masks!r}")
        if early_stop is not None and (not math.isfinite(early_stop) or early_stop < 0):
            raise ValueError(f"early_stop must be None or a tolerance >= 0, got {early_stop!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and early_stop is not None:
            raise ValueError("cuda_graph=True does not support early_stop (the captured step runs every sample "
                             "for all steps); use early_stop=None or cuda_graph=False")
        self.model = model.set_backend(backend).eval()  # attention and loss follow the same backend
        self.steps, self.step_size, self.halve_step, self.eta = steps, float(step_size), halve_step, float(eta)
        self.mask_ratio, self.n_masks, self.early_stop, self.seed = float(mask_ratio), n_masks, early_stop, seed
        self.backend, self.progress, self.batch_size, self.exact_graph = backend, progress, batch_size, exact_graph
        self.cuda_graph = cuda_graph
        self.precision = check_precision(precision)
        if not isinstance(cast_weights, bool):
            raise TypeError(f"cast_weights must be a bool, got {type(cast_weights).__name__}")
        self.cast_weights = cast_weights
        self._casts = CastModelCache(self.model)
        self._guard = PixelGuard()
        self._graphs: dict = {}  # chunk key -> _StepGraph (cuda_graph=True)
        self.last_steps_run: torch.Tensor | None = None  # per-sample number of steps taken by the last call

    def extra_repr(self) -> str:
        return (f"steps={self.steps}, step_size={self.step_size:.5g}, halve_step={self.halve_step}, eta={self.eta:.5g}, "
                f"mask_ratio={self.mask_ratio}, n_masks={self.n_masks}, early_stop={self.early_stop}, seed={self.seed}, "
                f"precision={self.precision!r}")

    @property
    def config(self) -> dict:
        return dict(steps=self.steps, step_size=self.step_size, halve_step=self.halve_step, eta=self.eta,
                    mask_ratio=self.mask_ratio, n_masks=self.n_masks, early_stop=self.early_stop, seed=self.seed)

    # ------------------------------------------------------------------ pieces
    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))

    def check_pending(self, wait: bool = True) -> None:
        """Raise ``ValueError`` if a deferred pixel check of an earlier CUDA input failed."""
        self._guard.check_pending("x", wait=wait)

    def step_size_at(self, s: int) -> float:
        """lambda at step s (0-based): halved for s >= S/2 when ``halve_step``."""
        return self.step_size / 2 if (self.halve_step and s >= self.steps // 2) else self.step_size

    def recon_loss(self, x: torch.Tensor, generator: torch.Generator | None = None,
                   loss_backend: str | None = None, amp_dtype: torch.dtype | None = None,
                   model: MaskedAutoencoderViT | None = None) -> torch.Tensor:
        """Per-sample masked reconstruction loss [N], mean over ``n_masks`` random masks (one batched forward).
        ``amp_dtype``: the model's compute dtype (default: ``compute_dtype(x.device)``); ``model``: the
        module that runs (default: ``compute_model(amp_dtype)``)."""
        noise = self._draw_noise(x.shape[0], generator, x.device)
        return self._recon_loss_noise(x, noise, loss_backend, amp_dtype, model)

    def _draw_noise(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """The masking noise of one step for a chunk of n samples: [n * n_masks, L]."""
        return torch.rand(n * self.n_masks, self.model.patch_embed.num_patches, generator=generator, device=device)

    def _recon_loss_noise(self, x: torch.Tensor, noise: torch.Tensor, loss_backend: str | None = None,
                          amp_dtype: torch.dtype | None = None, model: MaskedAutoencoderViT | None = None
                          ) -> torch.Tensor:
        """``recon_loss`` with given masking noise [N * n_masks, L] (no host sync, no data-dependent
        shape: CUDA-graph capturable). The MAE (a cast copy for bf16/fp16, autocast off; or the model
        under autocast with ``cast_weights=False``) sees the image in its weights' dtype; the loss is
        computed outside any autocast, on the prediction cast to the source model's dtype (fp32
        statistics and reduction for an fp32 model), so the input gradient comes back in that dtype."""
        n = x.shape[0]
        dev = x.device
        if amp_dtype is None:
            amp_dtype = self.compute_dtype(dev)
        m = self.compute_model(amp_dtype) if model is None else model
        tdtype = _float_dtype(self.model)  # the loss runs in the source model's dtype (fp32 as a rule)
        if x.dtype != tdtype:
            x = x.to(tdtype)
        xr = x.repeat(self.n_masks, 1, 1, 1) if self.n_masks > 1 else x
        mdtype = _float_dtype(m)
        with compute_context(m, dev, amp_dtype):
            latent, mask, ids_restore = m.forward_encoder(xr.to(mdtype) if xr.dtype != mdtype else xr,
                                                          self.mask_ratio, noise)
            pred = m.forward_decoder(latent, ids_restore)
        with fp32_region(dev):
            if pred.dtype != xr.dtype:
                pred, mask = pred.to(xr.dtype), mask.to(xr.dtype)
            per = patch_recon_loss(pred, xr, mask, patch_size=m.patch_size, norm_pix=m.norm_pix_loss, p=2,
                                   reduction="per_sample", backend=loss_backend or self.backend)
            return per.view(self.n_masks, n).mean(0)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x", ndim=4)
        self.model.check_input(x, "x")
        dev = next(self.model.parameters()).device
        if x.device != dev:
            raise ValueError(f"x is on {x.device} but the MAE is on {dev}")
        return x

    # ------------------------------------------------------------ no-grad path
    @torch.no_grad()
    def purify(self, x: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Purify without building a graph (chunks of ``batch_size``).

        ``validate`` checks the pixel values (finite, in [0, 1]): on CUDA with one host sync for a
        new (shape, dtype, device), asynchronously after that; on the CPU at once.
        ``validate=False`` skips them for inputs checked already. The steps themselves never
        synchronize (unless ``progress`` or ``early_stop`` asks for values on the host)."""
        self._check(x)
        if validate:
            self._guard(x, "x")
        if self.cuda_graph:
            if self.early_stop is not None:
                raise ValueError("cuda_graph=True does not support early_stop; set early_stop=None or cuda_graph=False")
            if x.device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs CUDA tensors, got x on {x.device}; "
                                 "use cuda_graph=False on the CPU")
            if self.model.training:
                raise ValueError("cuda_graph=True needs the MAE in eval mode (call .eval())")
        chunk = self._purify_chunk_graph if self.cuda_graph else self._purify_chunk
        gen = self._generator(x.device)
        amp = self.compute_dtype(x.device)
        self.compute_model(amp)  # cast / refresh the low-precision copy once per call, before the chunks
        outs, counts = [], []
        for k in range(0, x.shape[0], self.batch_size):
            o, c = chunk(x[k:k + self.batch_size], gen, amp_dtype=amp)
            outs.append(o)
            counts.append(c)
        self.last_steps_run = torch.cat(counts)
        return torch.cat(outs)

    def _purify_chunk(self, x: torch.Tensor, gen, amp_dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        if amp_dtype is None:
            amp_dtype = self.compute_dtype(x.device)
        model = self.compute_model(amp_dtype)
        x0 = x.detach().float().clone() if x.dtype != torch.float64 else x.detach().clone()
        xs = x0.clone()
        n = x0.shape[0]
        active = torch.arange(n, device=x.device)
        prev = None
        steps_run = torch.zeros(n, dtype=torch.int64, device=x.device)
        bar = tqdm(range(self.steps), desc="MAE-Pure", leave=False, disable=not self.progress)
        for s in bar:
            xa = xs.index_select(0, active) if active.numel() < n else xs
            with torch.enable_grad():
                xg = xa.detach().requires_grad_(True)
                loss = self.recon_loss(xg, gen, amp_dtype=amp_dtype, model=model)
                grad = torch.autograd.grad(loss.sum(), xg)[0]
            x0a = x0.index_select(0, active) if active.numel() < n else x0
            xa = xa.clone() if active.numel() < n else xa
            pgd_step_(xa, grad, x0a, self.step_size_at(s), self.eta, norm="linf", direction=-1,
                      clamp=(0.0, 1.0), backend=self.backend)
            steps_run.index_add_(0, active, torch.ones_like(active))
            if active.numel() < n:
                xs.index_copy_(0, active, xa)
            if self.progress:
                bar.set_postfix(loss=f"{float(loss.mean()):.4f}", active=int(active.numel()))
            if self.early_stop is not None:
                cur = loss.detach()
                if prev is not None:
                    keep = (prev - cur).abs() >= self.early_stop
                    active, cur = active[keep], cur[keep]
                    if active.numel() == 0:
                        break
                prev = cur
        return xs.to(x.dtype), steps_run

    # ------------------------------------------------------- CUDA-graph path
    def reset_cuda_graphs(self) -> None:
        """Drop the cached CUDA graphs and their static buffers / memory pools."""
        self._graphs.clear()

    def _graph_key(self, x0: torch.Tensor, amp_dtype: torch.dtype) -> tuple:
        """Everything a captured step bakes in: shapes, dtypes, settings, and the storages of the
        module that runs (the cast copy refreshes its weights in place, so a graph stays valid
        across weight updates; a rebuilt copy has new storages and gets a new graph)."""
        m = self.compute_model(amp_dtype)
        blocks = list(m.blocks) + list(m.decoder_blocks)
        return (tuple(x0.shape), x0.dtype, x0.device, amp_dtype, self.n_masks, self.mask_ratio, self.backend, m.ops_backend,
                m.norm_pix_loss, tuple((b.attn.fused_attn, b.attn.backend, b.attn.keep_attn) for b in blocks), id(m),
                tuple(p.data_ptr() for p in m.parameters()), tuple(b.data_ptr() for b in m.buffers()))

    def _step_graph(self, x0: torch.Tensor, capture: bool = True, amp_dtype: torch.dtype | None = None
                    ) -> "_StepGraph":
        if amp_dtype is None:
            amp_dtype = self.compute_dtype(x0.device)
        key = self._graph_key(x0, amp_dtype)
        sg = self._graphs.get(key) if capture else None
        if sg is None:
            sg = _StepGraph(self, x0, capture, amp_dtype)
            if capture:
                self._graphs[key] = sg
        return sg

    def _purify_chunk_graph(self, x: torch.Tensor, gen, capture: bool = True, amp_dtype: torch.dtype | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_purify_chunk`` (no early stop) by replays of one captured step. ``capture=False`` runs the
        same static-buffer code eagerly (any device; a CPU test of the bookkeeping). ``amp_dtype``: the
        model's compute dtype (default: ``compute_dtype``); its compute model runs inside the captured step."""
        if amp_dtype is None:
            amp_dtype = self.compute_dtype(x.device)
        for name, v in (("step_size", self.step_size), ("eta", self.eta)):  # pgd_step_'s checks, done once
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        x0 = x.detach().float() if x.dtype != torch.float64 else x.detach()
        n = x0.shape[0]
        steps_run = torch.full((n,), self.steps, dtype=torch.int64, device=x.device)
        if self.steps == 0:
            return x0.clone().to(x.dtype), steps_run
        sg = self._step_graph(x0, capture, amp_dtype)
        sg.x.copy_(x0)
        sg.x0.copy_(x0)
        sg.eps.fill_(self.eta)
        cur = None
        bar = tqdm(range(self.steps), desc="MAE-Pure (graph)", leave=False, disable=not self.progress)
        for s in bar:
            lam = self.step_size_at(s)
            if lam != cur:
                sg.step.fill_(lam)
                cur = lam
            sg.noise.copy_(self._draw_noise(n, gen, x.device))  # the eager path's draw, in its order
            sg.run()
            if self.progress:
                bar.set_postfix(loss=f"{float(sg.loss.mean()):.4f}")
        return sg.x.clone().to(x.dtype), steps_run

    def purification_step_(self, x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, step: torch.Tensor,
                           eps: torch.Tensor, amp_dtype: torch.dtype, model: MaskedAutoencoderViT,
                           pgd_backend: str) -> torch.Tensor:
        """One MAE-Pure step on static buffers, updating ``x`` in place; returns the per-sample loss.

        The masked MAE forward (``model`` in ``amp_dtype``; mask from ``noise`` [N * n_masks, L]),
        the reconstruction loss and its gradient with respect to ``x``, and the fused sign step
        ``x <- clip(x - step * sign(grad))`` to the ``eps``-ball around ``x0`` and to [0, 1]
        (``step``, ``eps``: per-sample tensors [N]). No host synchronization, no data-dependent
        shape, no allocation whose size depends on values, no argument check that reads a device
        value: the callable a CUDA graph captures (``cuda_graph=True``) and replays."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            loss = self._recon_loss_noise(xg, noise, amp_dtype=amp_dtype, model=model)
            grad = torch.autograd.grad(loss.sum(), xg)[0]
        _pgd_step_inplace_validated(x, grad, x0, step, eps, "linf", -1, 0.0, 1.0, pgd_backend)
        return loss.detach()

    # --------------------------------------------------------- differentiable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable through all S steps when ``x.requires_grad``; otherwise ``purify``.
        Metadata checks only: an attack calls this at every step, after its entry point checked
        the pixels once."""
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.purify(x, validate=False)
        self._check(x)
        if not self.exact_graph:
            return self._forward_graph(x)
        # double backward through the fused (SDPA) attention is not implemented on every
        # backend: use the explicit softmax path while building the create_graph graph
        blocks = list(self.model.blocks) + list(self.model.decoder_blocks)
        old = [b.attn.fused_attn for b in blocks]
        self.model.set_fused_attn(False)
        try:
            return self._forward_graph(x)
        finally:
            for b, f in zip(blocks, old):
                b.attn.fused_attn = f

    def _forward_graph(self, x: torch.Tensor) -> torch.Tensor:
        gen = self._generator(x.device)
        amp = self.compute_dtype(x.device)
        model = self.compute_model(amp)
        x0 = x
        xs = x
        n = x.shape[0]
        frozen = torch.zeros(n, dtype=torch.bool, device=x.device)
        prev = None
        steps_run = torch.zeros(n, dtype=torch.int64, device=x.device)
        for s in tqdm(range(self.steps), desc="MAE-Pure (grad)", leave=False, disable=not self.progress):
            if self.exact_graph:
                # reference loss: native loss kernels need not be twice differentiable
                loss = self.recon_loss(xs, gen, loss_backend="torch", amp_dtype=amp, model=model)
                g = torch.autograd.grad(loss.sum(), xs, create_graph=True)[0]
            else:
                with torch.enable_grad():
                    xg = xs.detach().requires_grad_(True)
                    loss = self.recon_loss(xg, gen, amp_dtype=amp, model=model)
                    g = torch.autograd.grad(loss.sum(), xg)[0]
            step = torch.full((n,), self.step_size_at(s), device=x.device, dtype=torch.float32)
            step = torch.where(frozen, torch.zeros_like(step), step)
            steps_run += (~frozen).long()
            # differentiable reference step (the fused kernels are not autograd ops)
            xs = pgd_step(xs, g, x0, step, self.eta, norm="linf", direction=-1, clamp=(0.0, 1.0), backend="torch")
            if self.early_stop is not None:
                cur = loss.detach()
                if prev is not None:
                    frozen = frozen | ((prev - cur).abs() < self.early_stop)
                    if bool(frozen.all()):
                        break
                prev = torch.where(frozen, prev if prev is not None else cur, cur)
        self.last_steps_run = steps_run
        return xs


class _StepGraph:
    """Static buffers of one chunk shape and one purification step on them, captured in a CUDA graph.

    Buffers: ``x`` (iterate, updated in place), ``x0`` (clean input), ``noise`` [N * n_masks, L],
    ``step`` / ``eps`` [N] (the iterate's dtype), ``loss`` [N] (output of the last run).
    ``amp_dtype``: the MAE's compute dtype; ``model``: the module that runs (the cast copy for
    bf16/fp16), fixed at construction. The step is ``MAEPure.purification_step_`` on these buffers.
    ``cuda``: the namespace the capture calls (``torch.cuda``; CPU tests pass a stand-in).
    """

    def __init__(self, pur: MAEPure, x0: torch.Tensor, capture: bool, amp_dtype: torch.dtype = torch.float32,
                 cuda=None):
        dev, cdtype = x0.device, x0.dtype
        n = x0.shape[0]
        length = pur.model.patch_embed.num_patches
        self.pur = pur
        self.amp_dtype = amp_dtype
        self.model = pur.compute_model(amp_dtype)
        self.x = torch.full_like(x0, 0.5, memory_format=torch.contiguous_format)
        self.x0 = torch.full_like(x0, 0.5, memory_format=torch.contiguous_format)
        # placeholder noise for the warm-up; deterministic, so building a graph never consumes RNG state
        self.noise = torch.linspace(0, 1, n * pur.n_masks * length, device=dev).view(n * pur.n_masks, length)
        self.step = torch.full((n,), pur.step_size, dtype=cdtype, device=dev)
        self.eps = torch.full((n,), pur.eta, dtype=cdtype, device=dev)
        self.backend = resolve_backend("pgd_step", pur.backend, dev)
        self.graph = None
        self.loss = torch.zeros(n, dtype=cdtype, device=dev)
        if capture:
            self._capture(dev, cuda if cuda is not None else torch.cuda)

    def _step(self) -> torch.Tensor:
        return self.pur.purification_step_(self.x, self.x0, self.noise, self.step, self.eps, self.amp_dtype,
                                           self.model, self.backend)

    def _capture(self, dev: torch.device, cuda) -> None:
        params = list(dict.fromkeys(list(self.pur.model.parameters()) + list(self.model.parameters())))
        old = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            with cuda.device(dev):
                # warm-up on a side stream (lazy init, cuBLAS handles, Triton JIT/autotune) as torch.cuda.graphs requires
                side = cuda.Stream()
                side.wait_stream(cuda.current_stream())
                with cuda.stream(side):
                    for _ in range(3):
                        self._step()
                cuda.current_stream().wait_stream(side)
                graph = cuda.CUDAGraph()
                with cuda.graph(graph):
                    self.loss = self._step()
            self.graph = graph
        finally:
            for p, r in zip(params, old):
                p.requires_grad_(r)

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.loss = self._step()


def mae_pure_purify(model: MaskedAutoencoderViT, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Functional shortcut: ``MAEPure(model, **kwargs).purify(x)``."""
    return MAEPure(model, **kwargs).purify(x)
