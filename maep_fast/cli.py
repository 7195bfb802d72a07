"""Command line: ``maep-fast <command>`` (also ``python -m maep_fast``).

Commands: demo, train-classifier, train, purify, eval. Numbers such as eps
accept fractions ("8/255").
"""
from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path


def _number(text: str) -> float:
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


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
    p.add_argument("--image-size", type=int, default=None, help="resize images to this square size")


def _load_data(args):
    from maep_fast.data import load_dataset

    return load_dataset(args.data, root=args.root, split=args.split, image_size=args.image_size)


def _loop_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")


def cmd_demo(args) -> int:
    from maep_fast.demo import QUICK, DemoConfig, run_demo

    cfg = DemoConfig(seed=args.seed, progress=not args.no_progress, **(QUICK if args.quick else {}))
    run_demo(args.out_dir, cfg)
    return 0


def cmd_train_classifier(args) -> int:
    from maep_fast.checkpoint import save_model
    from maep_fast.models.classifiers import SmallCNN, WideResNet
    from maep_fast.train.classifier import accuracy, train_classifier
    from maep_fast.train.loop import LoopConfig

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
                                           state_dir=str(Path(args.out) / "state"), resume=args.resume))
    acc = accuracy(model, ds.images, ds.labels)
    save_model(model, args.out, meta={"data": args.data, "image_size": ds.image_shape[-1], "train_accuracy": acc})
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
    ds = _load_data(args)
    c, h, _ = ds.image_shape
    model = create_mae(args.preset, img_size=h, in_chans=c).to(device)
    out = Path(args.out)
    progress = not args.no_progress
    cfg = MAEPConfig(
        mask_ratio=args.mask_ratio, w_pur=args.w_pur, w_mae=args.w_mae,
        attack=AttackConfig(norm=args.norm, eps=args.eps, step_size=args.step_size, steps=args.steps),
        stage1=LoopConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=progress,
                          desc="MAEP stage 1", state_dir=str(out / "state_stage1"), resume=args.resume),
        stage2=LoopConfig(epochs=args.stage2_epochs, batch_size=args.batch_size, lr=args.lr / 2, warmup_epochs=0.5,
                          seed=args.seed + 1, progress=progress, desc="MAEP stage 2 (LoRA)",
                          state_dir=str(out / "state_stage2"), resume=args.resume),
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
    )
    classifier = None
    if args.pairs:
        t = load_file(args.pairs)
        missing = {"clean", "adversarial", "labels"} - set(t)
        if missing:
            raise SystemExit(f"error: --pairs file {args.pairs} lacks tensors {sorted(missing)}")
        data = AdversarialPairs(t["clean"], t["adversarial"], t["labels"])
    else:
        if not args.classifier:
            raise SystemExit("error: give --classifier (pairs made online by PGD) or --pairs (precomputed)")
        classifier = load_model(args.classifier, expect_kind="classifier", map_location=device)
        data = ds
    history = train_maep(model, data, cfg, classifier)
    save_model(model, out / "maep", meta={"data": args.data, "preset": args.preset, "history": history})
    print(f"saved {out / 'maep'}")
    return 0


def cmd_purify(args) -> int:
    from maep_fast.data import load_images, save_images
    from maep_fast.purify.maep import Purifier

    device = _device(args.device)
    purifier = Purifier.from_checkpoint(args.purifier, map_location=device, batch_size=args.batch_size)
    paths = [Path(p) for p in args.inputs]
    x = load_images(paths, channels=purifier.model.in_chans, image_size=args.image_size).to(device)
    y = purifier.purify(x)
    out = Path(args.out_dir)
    written = save_images(y.cpu(), [out / (p.stem + ".png") for p in paths])
    print(f"purified {len(written)} image(s) into {out}")
    return 0


def cmd_eval(args) -> int:
    from maep_fast.checkpoint import load_model
    from maep_fast.evaluate import AttackSpec, evaluate, format_table
    from maep_fast.purify.maep import Purifier

    device = _device(args.device)
    classifier = load_model(args.classifier, expect_kind="classifier", map_location=device)
    purifier = Purifier.from_checkpoint(args.purifier, map_location=device) if args.purifier else None
    ds = _load_data(args)
    if args.n and args.n < len(ds):
        ds = ds.subset(args.n, seed=args.seed)
    spec = AttackSpec(norm=args.norm, eps=args.eps, step_size=args.step_size or args.eps / 4, steps=args.steps, eot=args.eot)
    report = evaluate(classifier, purifier, ds.images, ds.labels, spec, seed=args.seed, progress=not args.no_progress)
    print(format_table(report["rows"], {"purifier": "MAEP"}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": report["rows"], "attack": report["attack"],
                                              "classifier": args.classifier, "purifier": args.purifier,
                                              "data": args.data, "split": args.split}, indent=2))
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="maep-fast", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train and evaluate MAEP on the embedded digits (CPU, a few minutes)")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test, not meaningful numbers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-classifier", help="train the classifier to defend")
    _add_data_args(p, "train")
    _loop_args(p, epochs=15, lr=2e-3)
    p.add_argument("--arch", default="SmallCNN", choices=["SmallCNN", "WideResNet"])
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--widen", type=int, default=10)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("train", help="train a MAEP purifier (stage 1 masked, stage 2 decoder LoRA at r = 0)")
    _add_data_args(p, "train")
    _loop_args(p, epochs=20, lr=1e-3)
    p.add_argument("--preset", default="demo", help="model preset (see maep_fast.PRESETS)")
    p.add_argument("--classifier", help="classifier checkpoint to attack for online adversarial pairs")
    p.add_argument("--pairs", help="precomputed pairs: a safetensors file with clean, adversarial, labels")
    p.add_argument("--stage2-epochs", type=int, default=5)
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--w-pur", type=float, default=1.0, help="weight of the l1 purification loss")
    p.add_argument("--w-mae", type=float, default=1.0, help="weight of the masked MSE loss")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--eps", type=_number, default=8 / 255)
    p.add_argument("--step-size", type=_number, default=2 / 255)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--out", required=True, help="output directory (checkpoint in OUT/maep)")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("purify", help="purify image files, write PNGs")
    p.add_argument("--purifier", required=True, help="MAEP checkpoint directory")
    p.add_argument("inputs", nargs="+", help="image files")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--image-size", type=int, default=None, help="resize inputs to this size first")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("eval", help="clean and robust accuracy under named threat models")
    _add_data_args(p, "test")
    p.add_argument("--classifier", required=True)
    p.add_argument("--purifier", default=None)
    p.add_argument("--n", type=int, default=0, help="evaluate on a seeded random subset of this size (0 = all)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--eps", type=_number, default=8 / 255)
    p.add_argument("--step-size", type=_number, default=None, help="default eps/4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eot", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from maep_fast.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"maep-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
