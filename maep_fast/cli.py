"""Command line: ``maep-fast <command>`` (also ``python -m maep_fast``).

Commands: demo, train-classifier, pretrain, train, mimir, rmae-pure, purify, eval. Numbers such
as eps accept fractions ("8/255").

Every training command seeds torch, numpy and Python's ``random`` with
``--seed`` *before* it builds the model, and snapshots its whole state
(atomically) under ``OUT/state*``: two runs with the same ``--seed`` give
bit-identical checkpoints on one machine, and a run killed at any point and
restarted with ``--resume`` ends with the checkpoint of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from pathlib import Path


def _number(text: str) -> float:
    try:
        v = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def _number_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
               high_open: bool = False):
    """argparse type: a finite number (fractions such as 8/255 too) in the interval given by
    ``low`` / ``high`` (closed unless ``low_open`` / ``high_open``)."""
    from maep_fast._checks import interval_text

    def parse(text: str) -> float:
        v = _number(text)
        if (low is not None and (v <= low if low_open else v < low)) or \
                (high is not None and (v >= high if high_open else v > high)):
            raise argparse.ArgumentTypeError(f"must be {interval_text(low, high, low_open, high_open)}, got {text}")
        return v

    return parse


def _int_from(low: int):
    """argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text}")
        return v

    return parse


_COUNT = _int_from(0)  # steps, epochs, subset sizes, seeds (0 allowed)
_POSITIVE_INT = _int_from(1)  # batch sizes, image sizes, EOT samples
_NONNEG = _number_in(0)  # eps, step sizes, loss weights
_POSITIVE = _number_in(0, low_open=True)  # learning rates
_OPEN_RATIO = _number_in(0, 1, low_open=True, high_open=True)  # MAE mask ratios (some patch removed, some kept)
_RATIO = _number_in(0, 1, high_open=True)  # MAEP mask ratio, clean fraction


def _device_name(text: str) -> str:
    """argparse type: auto, cpu, cuda or cuda:N, and CUDA only when a CUDA device exists."""
    if text == "auto":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} requested but no CUDA device is available")
    return text


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line ``PROG: error: MESSAGE`` and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_out_path(path: Path, flag: str, *, directory: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: an existing file where
    a directory is wanted, an existing directory where a file is wanted, or a file on the way."""
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is an existing file, not a directory")
    if not directory and path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a directory")
            break


def _error_text(exc: BaseException) -> str:
    """One line describing ``exc``."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {str(exc.filename)!r}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but no CUDA device is available")
    return dev


def _add_data_args(p: argparse.ArgumentParser, split: str) -> None:
    p.add_argument("--data", default="digits", choices=["digits", "cifar10", "cifar100", "folder"],
                   help="data set (digits is embedded; the others read local files, never download)")
    p.add_argument("--root", default=None, help="local directory of cifar10/cifar100/folder data")
    p.add_argument("--split", default=split, choices=["train", "test"])
    p.add_argument("--image-size", type=_POSITIVE_INT, default=None, help="resize images to this square size")
    p.add_argument("--split-seed", type=_COUNT, default=None,
                   help="digits only: which fixed stratified train/test partition (default 0, the demo's); "
                        "use the same value for training and evaluation")
    if split == "train":
        p.add_argument("--subset", type=_COUNT, default=0,
                       help="train on a fixed random subset of this many samples (seed 0, whatever --seed); 0 = all")


def _load_data(args):
    from maep_fast.data import load_dataset

    ds = load_dataset(args.data, root=args.root, split=args.split, image_size=args.image_size,
                      split_seed=getattr(args, "split_seed", None))
    n = getattr(args, "subset", 0)
    if n:
        if n < 0:
            raise ValueError(f"--subset must be >= 0, got {n}")
        if n < len(ds):
            ds = ds.subset(n, seed=0)
    return ds


def _data_meta(args) -> dict:
    """The data a checkpoint or report came from: ``{"data": name, "split_seed": seed or None}``."""
    return {"data": args.data, "split_seed": getattr(args, "split_seed", None)}


def _loop_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    p.add_argument("--epochs", type=_COUNT, default=epochs)
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=128)
    p.add_argument("--lr", type=_POSITIVE, default=lr)
    p.add_argument("--seed", type=_COUNT, default=0, help="seeds model init, data order, masks and attacks")
    p.add_argument("--device", type=_device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--snapshot-every", type=_COUNT, default=0,
                   help="also write a resumable snapshot every N optimizer steps (default: after each epoch only)")


def _seed(args) -> None:
    """Seed every RNG before anything random (model init included) happens."""
    from maep_fast.train.common import set_seed

    set_seed(args.seed)


def cmd_demo(args) -> int:
    from maep_fast.demo import FULL, QUICK, DemoConfig, run_demo

    if args.quick and args.full:
        raise ValueError("--quick and --full exclude each other")
    preset = QUICK if args.quick else (FULL if args.full else {})
    out_dir = args.out_dir or ("runs/demo_full" if args.full else "runs/demo")
    cfg = DemoConfig.from_flat(preset, seed=args.seed, progress=not args.no_progress)
    run_demo(out_dir, cfg)
    return 0


def cmd_train_classifier(args) -> int:
    from maep_fast.checkpoint import save_model
    from maep_fast.models.classifiers import SmallCNN, WideResNet
    from maep_fast.train.classifier import accuracy, train_classifier
    from maep_fast.train.loop import LoopConfig

    _seed(args)
    ds = _load_data(args)
    c, _, _ = ds.image_shape
    if args.arch == "SmallCNN":
        model = SmallCNN(in_chans=c, num_classes=ds.num_classes)
    else:
        model = WideResNet(depth=args.depth, widen=args.widen, in_chans=c, num_classes=ds.num_classes,
                           mean=(0.5,) * c, std=(0.25,) * c)
    model = model.to(_device(args.device))
    train_classifier(model, ds, LoopConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                           weight_decay=5e-4, progress=not args.no_progress, desc="classifier",
                                           state_dir=str(Path(args.out) / "state"), resume=args.resume,
                                           snapshot_every=args.snapshot_every))
    acc = accuracy(model, ds.images, ds.labels)
    save_model(model, args.out, meta={**_data_meta(args), "image_size": ds.image_shape[-1], "train_accuracy": acc})
    print(f"train accuracy {100 * acc:.2f}%; saved {args.out}")
    return 0


def cmd_train(args) -> int:
    import torch
    from safetensors.torch import load_file

    from maep_fast.checkpoint import load_model, save_model
    from maep_fast.models.presets import create_mae
    from maep_fast.train.loop import LoopConfig
    from maep_fast.train.maep import AdversarialPairs, AttackConfig, MAEPConfig, train_maep

    device = _device(args.device)
    _seed(args)
    ds = _load_data(args)
    c, h, _ = ds.image_shape
    if args.init:
        model = load_model(args.init, expect_kind="mae", map_location=device)
        if model.config["img_size"] != h or model.config["in_chans"] != c:
            raise ValueError(f"--init {args.init} is a {model.config['in_chans']}x{model.config['img_size']} model, "
                             f"the data is {c}x{h}")
    else:
        model = create_mae(args.preset, img_size=h, in_chans=c).to(device)
    out = Path(args.out)
    progress = not args.no_progress
    cfg = MAEPConfig(
        mask_ratio=args.mask_ratio, w_pur=args.w_pur, w_mae=args.w_mae,
        attack=AttackConfig(norm=args.norm, eps=args.eps, step_size=args.step_size, steps=args.steps,
                            eps_min=args.eps_min, target=args.attack_target, classifier_frac=args.classifier_frac,
                            purifier_mask_ratio=args.purifier_mask_ratio, purifier_masks=args.purifier_masks,
                            eot=args.attack_eot, purifier_noise=args.purifier_noise),
        stage1=LoopConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=progress,
                          desc="MAEP stage 1", state_dir=str(out / "state_stage1"), resume=args.resume,
                          snapshot_every=args.snapshot_every),
        stage2=LoopConfig(epochs=args.stage2_epochs, batch_size=args.batch_size, lr=args.lr / 2, warmup_epochs=0.5,
                          seed=args.seed + 1, progress=progress, desc="MAEP stage 2 (LoRA)",
                          state_dir=str(out / "state_stage2"), resume=args.resume, snapshot_every=args.snapshot_every),
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, w_cls=args.w_cls, clean_frac=args.clean_frac,
        input_noise=args.input_noise,
    )
    classifier = None
    if args.pairs:
        t = load_file(args.pairs)
        missing = {"clean", "adversarial", "labels"} - set(t)
        if missing:
            raise SystemExit(f"error: --pairs file {args.pairs} lacks tensors {sorted(missing)}")
        data = AdversarialPairs(t["clean"], t["adversarial"], t["labels"])
        if args.classifier:  # for --w-cls
            classifier = load_model(args.classifier, expect_kind="classifier", map_location=device)
    else:
        if not args.classifier:
            raise SystemExit("error: give --classifier (pairs made online by PGD) or --pairs (precomputed)")
        classifier = load_model(args.classifier, expect_kind="classifier", map_location=device)
        data = ds
    history = train_maep(model, data, cfg, classifier)
    save_model(model, out / "maep", meta={**_data_meta(args), "preset": args.preset, "history": history})
    print(f"saved {out / 'maep'}")
    return 0


def cmd_pretrain(args) -> int:
    from maep_fast.checkpoint import load_model, save_model
    from maep_fast.models.mae import MaskedAutoencoderViT
    from maep_fast.models.presets import create_mae
    from maep_fast.train.loop import LoopConfig
    from maep_fast.train.mae_pretrain import MAEPretrainConfig, train_mae

    device = _device(args.device)
    _seed(args)
    ds = _load_data(args)
    c, h, _ = ds.image_shape
    norm_pix = {"auto": None, "on": True, "off": False}[args.norm_pix_loss]
    if args.init:
        if args.init.endswith((".pth", ".pt", ".bin", ".safetensors")) or Path(args.init).is_file():
            from maep_fast.models.mae_import import mae_from_checkpoint

            # position tables are adapted to the data's image size, as load_pretrained_mae does
            model = mae_from_checkpoint(args.init, img_size=h,
                                        **({"norm_pix_loss": norm_pix} if norm_pix is not None else {}))
        else:
            model = load_model(args.init, expect_kind="mae")
        if not isinstance(model, MaskedAutoencoderViT):
            raise ValueError(f"--init {args.init} is not a masked autoencoder")
        if (model.in_chans, model.img_size) != (c, h):
            raise ValueError(f"--init {args.init} takes {model.in_chans}x{model.img_size}x{model.img_size} images but "
                             f"--data {args.data} gives {c}x{h}x{h}; pass --image-size {model.img_size}")
    else:
        model = create_mae(args.preset, img_size=h, in_chans=c,
                           **({"norm_pix_loss": norm_pix} if norm_pix is not None else {}))
    model = model.to(device)
    out = Path(args.out)
    cfg = MAEPretrainConfig(
        mask_ratio=args.mask_ratio, norm_pix_loss=norm_pix, train=args.train,
        loop=LoopConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        warmup_epochs=args.warmup_epochs, progress=not args.no_progress, desc="MAE pretrain",
                        state_dir=str(out / "state"), resume=args.resume, snapshot_every=args.snapshot_every))
    history = train_mae(model, ds, cfg)
    save_model(model, out / "mae", meta={**_data_meta(args), "preset": None if args.init else args.preset,
                                          "init": args.init, "trained": f"MAE pretraining ({args.train})",
                                          "mask_ratio": args.mask_ratio, "history": history})
    print(f"final masked reconstruction loss {history[-1]['loss']:.5f}; saved {out / 'mae'}" if history
          else f"saved {out / 'mae'}")
    return 0


def cmd_mimir(args) -> int:
    from maep_fast.checkpoint import save_model
    from maep_fast.train.classifier import accuracy
    from maep_fast.train.mimir import MIMIRRecipe, train_mimir_vit

    device = _device(args.device)
    _seed(args)  # train_mimir_vit seeds again with --seed before it builds the model
    ds = _load_data(args)
    c, h, _ = ds.image_shape
    checks = [  # the single-flag ranges are argparse types; these relate flags to each other or to the data
        (h % args.patch_size == 0, f"--patch-size {args.patch_size} must divide the image size {h}"),
        (args.embed_dim % args.num_heads == 0,
         f"--embed-dim {args.embed_dim} must be a multiple of --num-heads {args.num_heads}"),
        (args.eps_start is None or args.eps_start <= args.eps,
         f"--eps-start {args.eps_start:g} must be <= --eps {args.eps:g}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    recipe = MIMIRRecipe(
        pretrain=args.pretrain, img_size=h, in_chans=c, num_classes=ds.num_classes, patch_size=args.patch_size,
        embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads, mask_ratio=args.mask_ratio,
        pretrain_epochs=args.pretrain_epochs, pretrain_lr=args.pretrain_lr, pretrain_eps=args.pretrain_eps,
        mi_weight=args.mi_weight, finetune_epochs=args.epochs, finetune_lr=args.lr, eps=args.eps,
        eps_start=args.eps_start, ramp_frac=args.ramp_frac, steps=args.steps, alpha=args.alpha,
        trades_beta=args.trades_beta, batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out)
    vit, mae, info = train_mimir_vit(ds, recipe, state_dir=out, resume=args.resume,
                                     snapshot_every=args.snapshot_every, progress=not args.no_progress, device=device)
    acc = accuracy(vit, ds.images, ds.labels)
    meta = {**_data_meta(args), "image_size": h, "trained": recipe.describe(), "recipe": info["recipe"],
            "train_accuracy": acc, "seconds": info["seconds"], "pretrain_history": info["pretrain_history"],
            "finetune_history": info["finetune_history"]}
    save_model(vit, out / "vit", meta=meta)
    if args.pretrain != "none":
        save_model(mae, out / "mae", meta={**_data_meta(args), "image_size": h, "trained": f"{args.pretrain} pretraining "
                                           f"{args.pretrain_epochs} epochs", "history": info["pretrain_history"]})
    print(f"{recipe.describe()}\ntrain accuracy {100 * acc:.2f}%; saved the ViT classifier to {out / 'vit'}"
          f" (evaluate: maep-fast eval --classifier {out / 'vit'} --attack ta-pgd --eps 16/255)")
    return 0


def cmd_rmae_pure(args) -> int:
    from dataclasses import asdict

    from maep_fast.checkpoint import load_model, save_model
    from maep_fast.train.loop import LoopConfig
    from maep_fast.train.rmae_pure import RMAEPureConfig, train_rmae_pure

    if args.unroll > args.train_steps:
        raise ValueError(f"--unroll {args.unroll} must be <= --train-steps {args.train_steps} (it counts the final "
                         "purification steps differentiated w.r.t. the MAE)")
    if args.w_cls == 0 and args.w_rec == 0:
        raise ValueError("--w-cls and --w-rec are both 0: nothing to train")
    out = Path(args.out)
    _check_out_path(out, "--out", directory=True)
    device = _device(args.device)
    _seed(args)
    ds = _load_data(args)
    c, h, _ = ds.image_shape
    model = load_model(args.mae, expect_kind="mae", map_location=device)
    if (model.in_chans, model.img_size) != (c, h):
        raise ValueError(f"--mae {args.mae} takes {model.in_chans}x{model.img_size}x{model.img_size} images but "
                         f"--data {args.data} gives {c}x{h}x{h}; pass --image-size {model.img_size}")
    classifier = load_model(args.classifier, expect_kind="classifier", map_location=device)
    cfg = RMAEPureConfig(
        norm=args.norm, eps=args.eps, attack_step_size=args.step_size if args.step_size is not None else args.eps / 4,
        attack_steps=args.steps, eot=args.attack_eot, train_steps=args.train_steps, step_size=args.pure_step_size,
        halve_step=not args.no_halve, eta=args.eta, mask_ratio=args.mask_ratio, n_masks=args.masks,
        unroll=args.unroll, surrogate_temperature=args.temperature, w_cls=args.w_cls, w_rec=args.w_rec,
        rec_mask_ratio=args.rec_mask_ratio, clean_frac=args.clean_frac, regenerate_every=args.regenerate_every,
        loop=LoopConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        warmup_epochs=args.warmup_epochs, progress=not args.no_progress, desc="RMAE-Pure",
                        state_dir=str(out / "state"), resume=args.resume, snapshot_every=args.snapshot_every))
    result = train_rmae_pure(model, ds, classifier, cfg)
    recipe = {k: v for k, v in asdict(cfg).items() if k != "loop"}
    recipe.update(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup_epochs=args.warmup_epochs,
                  seed=args.seed)
    save_model(model, out / "mae", meta={**_data_meta(args), "image_size": h, "init": args.mae,
                                          "classifier": args.classifier,
                                          "trained": f"RMAE-Pure finetune {args.epochs} epochs (stage I PGD through "
                                                     f"MAE-Pure, stage II straight-through sign, unroll {args.unroll})",
                                          "recipe": recipe, "history": result["history"],
                                          "regenerated_at": result["regenerated_at"], "seconds": result["seconds"]})
    last = result["history"][-1] if result["history"] else None
    summary = (f"last epoch: ce_cls {last['ce_cls']:.4f}, stage-I accuracy {100 * last['stage1_acc']:.1f}%; "
               if last else "")
    print(f"{summary}saved {out / 'mae'} (evaluate: maep-fast eval --purifier {out / 'mae'} "
          f"--purifier-kind mae-pure --classifier {args.classifier})")
    return 0


def _add_mae_pure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MAE-Pure (test-time loss descent; defaults: published CIFAR-10 values, eta ours)")
    g.add_argument("--mp-steps", type=_COUNT, default=150, help="iterations S (published 150)")
    g.add_argument("--mp-step-size", type=_NONNEG, default=1 / 255, help="step lambda (published 1/255, halved after S/2)")
    g.add_argument("--mp-no-halve", action="store_true", help="do not halve the step after S/2")
    g.add_argument("--mp-eta", type=_NONNEG, default=8 / 255, help="L-inf clip radius (not published; our default 8/255)")
    g.add_argument("--mp-mask-ratio", type=_OPEN_RATIO, default=0.25, help="mask ratio (published 0.25 CIFAR-10, 0.20 ImageNet)")
    g.add_argument("--mp-masks", type=_POSITIVE_INT, default=1, help="random masks averaged per step (not published)")
    g.add_argument("--mp-early-stop", type=_NONNEG, default=None, help="per-sample tolerance on the loss change")
    g.add_argument("--mp-seed", type=_COUNT, default=None, help="seed the masks (deterministic purifier); default random")


def _mae_pure(model, args):
    from maep_fast.purify.mae_pure import MAEPure

    return MAEPure(model, steps=args.mp_steps, step_size=args.mp_step_size, halve_step=not args.mp_no_halve,
                   eta=args.mp_eta, mask_ratio=args.mp_mask_ratio, n_masks=args.mp_masks, early_stop=args.mp_early_stop,
                   seed=args.mp_seed, progress=args.command == "purify")


def cmd_purify(args) -> int:
    from maep_fast.checkpoint import load_model
    from maep_fast.data import load_images, save_images
    from maep_fast.purify.maep import Purifier

    paths = [Path(p) for p in args.inputs]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"input {str(p)!r} {'is a directory, not an image file' if p.is_dir() else 'does not exist'}")
    out = Path(args.out_dir)
    _check_out_path(out, "--out-dir", directory=True)
    device = _device(args.device)
    if args.method == "mae-pure":
        purifier = _mae_pure(load_model(args.purifier, expect_kind="mae", map_location=device), args)
        purifier.batch_size = args.batch_size
        image_size = args.image_size or purifier.model.img_size
    else:
        purifier = Purifier.from_checkpoint(args.purifier, map_location=device, batch_size=args.batch_size)
        image_size = args.image_size
    x = load_images(paths, channels=purifier.model.in_chans, image_size=image_size).to(device)
    y = purifier.purify(x)
    written = save_images(y.cpu(), [out / (p.stem + ".png") for p in paths])
    print(f"purified {len(written)} image(s) into {out}")
    return 0


def _eval_strict(args, classifier, purifier, ds) -> int:
    from maep_fast.evaluate import evaluate_strict, markdown_table

    if purifier is None:
        raise ValueError("--strict attacks through a purifier: give --purifier")
    rep = evaluate_strict(classifier, purifier, ds.images, ds.labels, eps=args.eps, norm=args.norm,
                          steps=args.strict_steps, eot=args.strict_eot, autoattack=args.strict_aa_steps > 0,
                          aa_steps=max(1, args.strict_aa_steps), seed=args.seed, progress=not args.no_progress)
    print(markdown_table(rep["rows"]))
    print(f"budget: {rep['settings']['budget']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**rep, "classifier": args.classifier, "purifier": args.purifier,
                                              "purifier_kind": args.purifier_kind, **_data_meta(args)}, indent=2))
        print(f"wrote {args.out}")
    return 0


def cmd_eval(args) -> int:
    from maep_fast.checkpoint import load_model
    from maep_fast.evaluate import THREAT_MODELS, AttackSpec, evaluate, format_table
    from maep_fast.purify.maep import Purifier

    if args.eps_sweep is not None:
        try:
            sweep = [_NONNEG(e) for e in args.eps_sweep.split(",") if e.strip()]
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--eps-sweep: every eps {exc}") from None
        if not sweep:
            raise ValueError(f"--eps-sweep must list at least one eps, got {args.eps_sweep!r}")
    if args.threat_models is not None:
        bad = [t for t in (t.strip() for t in args.threat_models.split(",")) if t and t not in THREAT_MODELS]
        if bad:
            raise ValueError(f"--threat-models: unknown {bad}; choose from {', '.join(THREAT_MODELS)}")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path:
            _check_out_path(Path(path), flag, directory=False)
    device = _device(args.device)
    classifier = load_model(args.classifier, expect_kind="classifier", map_location=device)
    if args.purifier and args.purifier_kind == "mae-pure":
        purifier = _mae_pure(load_model(args.purifier, expect_kind="mae", map_location=device), args)
    else:
        purifier = Purifier.from_checkpoint(args.purifier, map_location=device) if args.purifier else None
    ds = _load_data(args)
    if args.n and args.n < len(ds):
        ds = ds.subset(args.n, seed=args.seed)
    if args.strict:
        return _eval_strict(args, classifier, purifier, ds)
    if args.threat_models or args.attack != "pgd" or args.purifier_kind != "maep" or args.eps_sweep:
        return _eval_threat_models(args, classifier, purifier, ds)
    spec = AttackSpec(norm=args.norm, eps=args.eps, step_size=args.step_size or args.eps / 4, steps=args.steps, eot=args.eot)
    report = evaluate(classifier, purifier, ds.images, ds.labels, spec, seed=args.seed, progress=not args.no_progress)
    print(format_table(report["rows"], {"purifier": "MAEP"}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": report["rows"], "attack": report["attack"],
                                              "classifier": args.classifier, "purifier": args.purifier,
                                              **_data_meta(args), "split": args.split}, indent=2))
        print(f"wrote {args.out}")
    return 0


def _eval_threat_models(args, classifier, purifier, ds) -> int:
    from maep_fast.evaluate import THREAT_MODELS, EvalConfig, accuracy_vs_eps, evaluate_threat_models, format_table

    tms = [t.strip() for t in args.threat_models.split(",") if t.strip()] if args.threat_models else list(THREAT_MODELS)
    # --eot-adaptive wins; a non-default legacy --eot is honoured; else 20 for randomized purifiers, 1 otherwise
    eot = args.eot_adaptive if args.eot_adaptive is not None else (args.eot if args.eot != 1 else None)
    config = EvalConfig(threat_models=tuple(tms), attack=args.attack, norm=args.norm, eps=args.eps, steps=args.steps,
                        step_size=args.step_size, eot=eot, version=args.aa_version, seed=args.seed,
                        progress=not args.no_progress, defense=args.purifier_kind,
                        n_classes=getattr(ds, "num_classes", None))
    if args.eps_sweep:
        eps_list = [_number(e) for e in args.eps_sweep.split(",") if e.strip()]
        plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
        report = accuracy_vs_eps(classifier, purifier, ds.images, ds.labels, eps_list, config, plot=plot)
    else:
        report = evaluate_threat_models(classifier, purifier, ds.images, ds.labels, config)
    print(format_table(report["rows"]))
    for c in report["sanity"]:
        print(f"[sanity {'ok  ' if c['passed'] else 'FAIL'}] {c['check']}: {c['message']}")
    if report.get("plot"):
        print(f"wrote {report['plot']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**report, "classifier": args.classifier, "purifier": args.purifier,
                                              "purifier_kind": args.purifier_kind, **_data_meta(args),
                                              "split": args.split}, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="maep-fast", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train and evaluate MAEP on the embedded digits (CPU, a few minutes)")
    p.add_argument("--out-dir", default=None, help="default runs/demo (runs/demo_full with --full)")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test, not meaningful numbers)")
    p.add_argument("--full", action="store_true",
                   help="the quality run: longer training, eps 8/16/32, our PGD-20 + torchattacks PGD-20 + AutoAttack, "
                        "full table, accuracy-vs-eps plot, labelled image grid")
    p.add_argument("--seed", type=_COUNT, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-classifier", help="train the classifier to defend")
    _add_data_args(p, "train")
    _loop_args(p, epochs=15, lr=2e-3)
    p.add_argument("--arch", default="SmallCNN", choices=["SmallCNN", "WideResNet"])
    p.add_argument("--depth", type=_int_from(4), default=28)
    p.add_argument("--widen", type=_POSITIVE_INT, default=10)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("pretrain", help="MAE pretraining on clean images (the MAE that MAE-Pure purifies with)")
    _add_data_args(p, "train")
    _loop_args(p, epochs=50, lr=1.5e-3)
    p.add_argument("--preset", default="demo", help="model preset (see maep_fast.PRESETS)")
    p.add_argument("--init", default=None,
                   help="start from this MAE: a maep_fast checkpoint directory or a published MAE file "
                        "(facebookresearch/mae .pth, timm); with --train decoder its encoder stays as published")
    p.add_argument("--train", default="all", choices=["all", "decoder"],
                   help="all: the whole MAE; decoder: freeze the encoder, train only the decoder parts")
    p.add_argument("--mask-ratio", type=_OPEN_RATIO, default=0.75, help="MAE's mask ratio (default 0.75)")
    p.add_argument("--norm-pix-loss", default="auto", choices=["auto", "on", "off"],
                   help="per-patch normalized target (auto: the preset's / --init model's setting)")
    p.add_argument("--warmup-epochs", type=_NONNEG, default=2.0)
    p.add_argument("--out", required=True, help="output directory (checkpoint in OUT/mae, snapshots in OUT/state)")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", help="train a MAEP purifier (stage 1 masked, stage 2 decoder LoRA at r = 0)")
    _add_data_args(p, "train")
    _loop_args(p, epochs=20, lr=1e-3)
    p.add_argument("--preset", default="demo", help="model preset (see maep_fast.PRESETS)")
    p.add_argument("--classifier", help="classifier checkpoint to attack for online adversarial pairs")
    p.add_argument("--pairs", help="precomputed pairs: a safetensors file with clean, adversarial, labels")
    p.add_argument("--stage2-epochs", type=_COUNT, default=5)
    p.add_argument("--mask-ratio", type=_RATIO, default=0.5)
    p.add_argument("--w-pur", type=_NONNEG, default=1.0, help="weight of the l1 purification loss")
    p.add_argument("--w-mae", type=_NONNEG, default=1.0, help="weight of the masked MSE loss")
    p.add_argument("--w-cls", type=_NONNEG, default=0.0,
                   help="classifier guidance: weight of KL(f(x) || f(P(x_adv))) with the --classifier f (not in the "
                        "MAEP paper; 0 = the published loss)")
    p.add_argument("--clean-frac", type=_RATIO, default=0.0,
                   help="fraction of each batch purified from the clean image (x -> x pairs)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--eps", type=_NONNEG, default=8 / 255)
    p.add_argument("--step-size", type=_NONNEG, default=2 / 255)
    p.add_argument("--steps", type=_COUNT, default=10)
    p.add_argument("--eps-min", type=_NONNEG, default=None,
                   help="draw each batch's eps uniformly from [eps-min, eps] (step size scaled with it)")
    p.add_argument("--attack-target", default="classifier", choices=["classifier", "defended"],
                   help="what the training PGD attacks: classifier (the paper) or defended = classifier(purifier(x)) "
                        "with the purifier's current weights (adversarial training through the purifier; needs "
                        "--w-cls > 0)")
    p.add_argument("--classifier-frac", type=_number_in(0, 1), default=0.0,
                   help="with --attack-target defended: share of batches that still get classifier-only pairs")
    p.add_argument("--purifier-mask-ratio", type=_RATIO, default=0.0,
                   help="with --attack-target defended: the purifier the attack sees runs at this mask ratio "
                        "(0 = one MAEP pass; > 0 = the mean of --purifier-masks random-mask reconstructions)")
    p.add_argument("--purifier-masks", type=_POSITIVE_INT, default=1,
                   help="random-mask reconstructions averaged (see --purifier-mask-ratio)")
    p.add_argument("--attack-eot", type=_POSITIVE_INT, default=1,
                   help="with --attack-target defended: gradient samples averaged per PGD step (EOT)")
    p.add_argument("--purifier-noise", type=_NONNEG, default=0.0,
                   help="with --attack-target defended: the purifier the attack sees adds Gaussian noise of this std "
                        "to its input (averaged over --purifier-masks draws)")
    p.add_argument("--input-noise", type=_NONNEG, default=0.0,
                   help="Gaussian noise of this std added to every training input (a noisy purifier: run it with "
                        "RandomizedMAEP(noise_std=...))")
    p.add_argument("--init", default=None, help="start from this MAEP / MAE checkpoint instead of a fresh preset")
    p.add_argument("--lora-rank", type=_POSITIVE_INT, default=8)
    p.add_argument("--lora-alpha", type=_NONNEG, default=16.0)
    p.add_argument("--out", required=True, help="output directory (checkpoint in OUT/maep)")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("mimir", help="MIMIR: adversarial MAE pretraining + adversarial finetuning of a ViT classifier")
    _add_data_args(p, "train")
    _loop_args(p, epochs=15, lr=1e-3)
    p.set_defaults(batch_size=64)
    p.add_argument("--pretrain", default="mimir", choices=["mimir", "mae", "none"],
                   help="mimir: MIMIR pretraining; mae: plain MAE pretraining; none: adversarial training from scratch")
    p.add_argument("--pretrain-epochs", type=_COUNT, default=20)
    p.add_argument("--pretrain-lr", type=_POSITIVE, default=1.5e-3)
    p.add_argument("--pretrain-eps", type=_NONNEG, default=8 / 255, help="MIMIR's PGD_MAE radius (alpha 10/8 of it)")
    p.add_argument("--mi-weight", type=_NONNEG, default=1e-5, help="weight of MIMIR's HSIC penalty (published 1e-5)")
    p.add_argument("--mask-ratio", type=_OPEN_RATIO, default=0.75)
    p.add_argument("--patch-size", type=_POSITIVE_INT, default=4, help="4: 16 tokens on 16x16 images; 2: 64 tokens")
    p.add_argument("--embed-dim", type=_POSITIVE_INT, default=96)
    p.add_argument("--depth", type=_POSITIVE_INT, default=4)
    p.add_argument("--num-heads", type=_POSITIVE_INT, default=4)
    p.add_argument("--eps", type=_NONNEG, default=16 / 255, help="finetuning eps (L-inf; the ramp's end)")
    p.add_argument("--eps-start", type=lambda t: None if t.lower() == "none" else _NONNEG(t), default=0.0,
                   help="ramp the finetuning eps from this value up to --eps ('none': no ramp)")
    p.add_argument("--ramp-frac", type=_number_in(0, 1), default=0.3,
                   help="fraction of the finetuning steps the eps ramp takes")
    p.add_argument("--steps", type=_COUNT, default=3, help="PGD steps of the finetuning attack")
    p.add_argument("--alpha", type=_NONNEG, default=None, help="PGD step size (default 2.5 * eps / steps)")
    p.add_argument("--trades-beta", type=lambda t: None if t.lower() == "none" else _NONNEG(t), default=6.0,
                   help="TRADES beta; 'none': PGD-AT (Madry)")
    p.add_argument("--out", required=True,
                   help="output directory (ViT classifier in OUT/vit, pretrained MAE in OUT/mae, snapshots in OUT/state_*)")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_mimir)

    p = sub.add_parser("rmae-pure", help="RMAE-Pure: finetune a MAE through MAE-Pure on adversarial examples "
                                         "(stage I PGD through the purifier, stage II classification loss)")
    _add_data_args(p, "train")
    _loop_args(p, epochs=5, lr=1e-4)
    p.add_argument("--mae", required=True, help="the MAE to finetune (a maep_fast MAE checkpoint directory)")
    p.add_argument("--classifier", required=True, help="the frozen classifier to defend (checkpoint directory)")
    p.add_argument("--warmup-epochs", type=_NONNEG, default=0.5)
    p.add_argument("--norm", default="linf", choices=["linf", "l2"], help="stage-I attack norm")
    p.add_argument("--eps", type=_NONNEG, default=8 / 255, help="stage-I attack radius (default 8/255)")
    p.add_argument("--step-size", type=_NONNEG, default=None, help="stage-I PGD step (default eps/4)")
    p.add_argument("--steps", type=_COUNT, default=10, help="stage-I PGD steps")
    p.add_argument("--attack-eot", type=_POSITIVE_INT, default=1, help="stage-I gradient samples per PGD step")
    p.add_argument("--train-steps", type=_POSITIVE_INT, default=10, help="purification steps S_train during training")
    p.add_argument("--pure-step-size", type=_NONNEG, default=1 / 255,
                   help="purification step lambda (MAE-Pure's 1/255, halved after S_train/2)")
    p.add_argument("--no-halve", action="store_true", help="do not halve the purification step after S_train/2")
    p.add_argument("--eta", type=_NONNEG, default=8 / 255, help="purification L-inf clip radius")
    p.add_argument("--mask-ratio", type=_OPEN_RATIO, default=0.25, help="purification mask ratio")
    p.add_argument("--masks", type=_POSITIVE_INT, default=1, help="random masks averaged per purification step")
    p.add_argument("--unroll", type=_POSITIVE_INT, default=2,
                   help="final purification steps differentiated w.r.t. the MAE (straight-through sign)")
    p.add_argument("--temperature", type=_POSITIVE, default=1.0,
                   help="surrogate tau: backward of sign(g) is that of tanh(g / (tau * mean|g|))")
    p.add_argument("--w-cls", type=_NONNEG, default=1.0, help="weight of CE(classifier(purified x_adv), y)")
    p.add_argument("--w-rec", type=_NONNEG, default=1.0, help="weight of the MAE loss on the clean images")
    p.add_argument("--rec-mask-ratio", type=_OPEN_RATIO, default=0.75, help="mask ratio of the MAE loss term")
    p.add_argument("--clean-frac", type=_RATIO, default=0.0, help="fraction of each batch purified from the clean image")
    p.add_argument("--regenerate-every", type=_POSITIVE_INT, default=1, help="epochs between stage-I regenerations")
    p.add_argument("--out", required=True, help="output directory (checkpoint in OUT/mae, snapshots in OUT/state)")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_rmae_pure)

    p = sub.add_parser("purify", help="purify image files, write PNGs")
    p.add_argument("--purifier", required=True, help="MAEP checkpoint directory")
    p.add_argument("inputs", nargs="+", help="image files")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--image-size", type=_POSITIVE_INT, default=None, help="resize inputs to this size first")
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=256)
    p.add_argument("--device", type=_device_name, default="auto")
    p.add_argument("--method", default="maep", choices=["maep", "mae-pure"],
                   help="maep: one forward pass of a MAEP checkpoint; mae-pure: test-time loss descent with any MAE")
    _add_mae_pure_args(p)
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("eval", help="clean and robust accuracy under named threat models")
    _add_data_args(p, "test")
    p.add_argument("--classifier", required=True)
    p.add_argument("--purifier", default=None)
    p.add_argument("--n", type=_COUNT, default=0, help="evaluate on a seeded random subset of this size (0 = all)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--eps", type=_NONNEG, default=8 / 255)
    p.add_argument("--step-size", type=_NONNEG, default=None, help="default eps/4")
    p.add_argument("--steps", type=_COUNT, default=20)
    p.add_argument("--eot", type=_POSITIVE_INT, default=1)
    p.add_argument("--seed", type=_COUNT, default=0)
    p.add_argument("--device", type=_device_name, default="auto")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threat-models", default=None,
                   help="comma list of oblivious,adaptive-full-gradient,bpda-eot (default: all three); "
                        "selects the threat-model report with sanity checks")
    p.add_argument("--attack", default="pgd", choices=["pgd", "ta-pgd", "autoattack", "apgd", "apgd-t"],
                   help="pgd (ours), ta-pgd (torchattacks' PGD/EOTPGD), autoattack / apgd / apgd-t (torchattacks)")
    p.add_argument("--aa-version", default="standard", choices=["standard", "rand"],
                   help="AutoAttack version (rand: APGD-CE/DLR with EOT 20, for randomized defenses)")
    p.add_argument("--eot-adaptive", type=_POSITIVE_INT, default=None,
                   help="EOT samples for adaptive/BPDA attacks (default 20 for randomized purifiers, else 1)")
    p.add_argument("--purifier-kind", default="maep", choices=["maep", "mae-pure"],
                   help="maep: MAEP single pass; mae-pure: MAE-Pure test-time descent with the --purifier MAE")
    p.add_argument("--strict", action="store_true",
                   help="the strict adaptive preset for randomized purifiers: PGD with EOT through every "
                        "purification step, and AutoAttack-rand (rows say the budget)")
    p.add_argument("--strict-steps", type=_POSITIVE_INT, default=200, help="--strict PGD steps (paper: 200)")
    p.add_argument("--strict-eot", type=_POSITIVE_INT, default=20, help="--strict EOT samples (paper: 20)")
    p.add_argument("--strict-aa-steps", type=_COUNT, default=100,
                   help="--strict AutoAttack-rand APGD iterations (paper: 100; 0 = PGD only)")
    p.add_argument("--eps-sweep", default=None, help="comma list of eps (e.g. 2/255,4/255,8/255,16/255): accuracy vs eps")
    p.add_argument("--plot", default=None, help="PNG for --eps-sweep (default: --out with .png)")
    _add_mae_pure_args(p)
    p.set_defaults(func=cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from maep_fast.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, OSError, ValueError, TypeError) as exc:
        print(f"maep-fast {args.command}: error: {_error_text(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
