"""The demo's evaluation rows under precision="fp32" and precision="bf16", same models, same device.

    python3 bench/precision_demo.py --run runs/demo --device cuda     # checkpoints of `python3 -m maep_fast demo`
    python3 bench/precision_demo.py --dry-run                         # CPU, untrained demo-sized models, 8 images

What decides ``AUTO_PRECISION["cuda"]`` (maep_fast/purify/maep.py): CUDA's default precision
switches to bf16 when, on a GPU, bf16 moves none of the demo's robust-accuracy rows by more than
1 point. This script runs the rows the demo reports with the demo's own settings (DemoConfig
defaults: MAEP on all test images, clean / oblivious / adaptive full-gradient PGD-20 at 16/255;
MAE-Pure S=50 on its 64-image subset, clean / oblivious / adaptive / BPDA+EOT) once per
precision, through ``maep_fast.demo._sweep`` with the images on ``--device``, and writes every
row (with its fp32 twin's accuracy and the difference) to bench/results/precision_demo_<device>.json
/.csv the moment it is measured; ``meta.verdict`` says whether every row moved by <= 1 point.

The models come from a demo run directory (``--run``: classifier/, maep/, mae/ as the demo saves
them); ``--dry-run`` uses freshly initialized demo-sized models instead (plumbing only: the
accuracies mean nothing).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import append_row, run_meta, start_results  # noqa: E402

from maep_fast.demo import DemoConfig, _sweep  # noqa: E402
from maep_fast.purify.mae_pure import MAEPure  # noqa: E402
from maep_fast.purify.maep import AUTO_PRECISION, Purifier  # noqa: E402

PRECISIONS = ("fp32", "bf16")
KEY = ("defense", "threat_model", "attack", "eps", "steps", "eot", "n")


def load_models(run: Path | None, device: torch.device, image_size: int):
    if run is None:
        from maep_fast.models.classifiers import SmallCNN
        from maep_fast.models.presets import create_mae

        torch.manual_seed(0)
        clf = SmallCNN(in_chans=1, num_classes=10)
        maep, mae = create_mae("demo", img_size=image_size), create_mae("demo", img_size=image_size)
    else:
        from maep_fast.checkpoint import load_model

        clf, maep, mae = (load_model(run / name) for name in ("classifier", "maep", "mae"))
    for m in (clf, maep, mae):
        m.to(device).eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return clf, maep, mae


class _OnDevice:
    """A data set's images and labels on ``device`` (what ``_sweep`` reads: len, images, labels)."""

    def __init__(self, ds, device: torch.device):
        self.images, self.labels = ds.images.to(device), ds.labels.to(device)

    def __len__(self) -> int:
        return self.images.shape[0]


def on_device(ds, device: torch.device) -> _OnDevice:
    return _OnDevice(ds, device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="demo output directory (classifier/, maep/, mae/)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="CPU, untrained models, 8 images, 2-step attacks")
    ap.add_argument("--n-eval", type=int, default=None, help="MAEP images (default: the demo's, all 360)")
    ap.add_argument("--mp-n", type=int, default=None, help="MAE-Pure images (default: the demo's 64)")
    ap.add_argument("--no-mae-pure", action="store_true")
    ap.add_argument("--name", default=None, help="results file stem (default precision_demo_<device>)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    elif args.run is None:
        raise SystemExit("--run DIR (a demo output directory) is required unless --dry-run")
    device = torch.device(args.device)
    cfg = DemoConfig(progress=False)
    if args.dry_run:
        cfg.eval_steps = 2
        cfg.mae_pure = replace(cfg.mae_pure, steps=2, attack_steps=1, eot=1)
        args.n_eval, args.mp_n = args.n_eval or 8, args.mp_n or 4
    from maep_fast.data import load_digits_dataset

    test = load_digits_dataset(cfg.image_size, "test")
    n_eval = args.n_eval or cfg.n_eval
    ev_cpu = test.subset(n_eval) if n_eval < len(test) else test
    mp = cfg.mae_pure
    mp_n = args.mp_n or mp.n
    ev_m_cpu = ev_cpu if mp_n >= len(ev_cpu) else test.subset(mp_n, seed=cfg.seed)
    ev, ev_m = on_device(ev_cpu, device), on_device(ev_m_cpu, device)
    cfg.n_eval = len(ev_cpu)  # _sweep names the undefended baseline by it
    clf, maep, mae = load_models(args.run, device, cfg.image_size)

    meta = run_meta(device)
    meta.update(run=str(args.run) if args.run else None, dry_run=args.dry_run, n_eval=len(ev_cpu), mp_n=len(ev_m_cpu),
                auto_precision=dict(AUTO_PRECISION), criterion="every row's accuracy moves by <= 1 point under bf16",
                demo_config={k: cfg.to_flat()[k] for k in ("eval_eps", "eval_steps", "mp_steps", "mp_step_size",
                                                            "mp_eta", "mp_mask_ratio", "mp_masks", "mp_attack_steps",
                                                            "mp_eot", "seed")})
    writer = start_results(args.name or f"precision_demo_{device.type}", meta)
    print(f"writing {writer.json_path} row by row", flush=True)
    t0 = time.time()
    base: dict[tuple, float] = {}
    worst = 0.0
    for precision in PRECISIONS:
        sections = [("MAEP", lambda: Purifier(maep, precision=precision), ev, dict(
            randomized=False, threat_models=("oblivious", "adaptive-full-gradient"), eot=1, steps=cfg.eval_steps))]
        if not args.no_mae_pure:
            sections.append(("MAE-Pure", lambda: MAEPure(
                mae, steps=mp.steps, step_size=mp.step_size, halve_step=True, eta=mp.eta,
                mask_ratio=mp.mask_ratio, n_masks=mp.masks, precision=precision), ev_m, dict(
                randomized=True, threat_models=("oblivious", "adaptive-full-gradient", "bpda-eot"), eot=mp.eot,
                steps=mp.attack_steps, aa_steps=mp.aa_steps, attacks=mp.attacks or cfg.attacks)))
        for defense, make, data, kw in sections:
            t = time.time()
            torch.manual_seed(cfg.seed)
            sec = _sweep(cfg, clf, make(), data, defense=defense, note=f"precision={precision}", **kw)
            for r in sec["rows"]:
                key = tuple(r.get(k) for k in KEY)
                row = {"precision": precision, "section": defense, **{k: r.get(k) for k in KEY},
                       "accuracy": r["accuracy"], "seconds": round(time.time() - t, 1)}
                if precision == "fp32":
                    base[key] = r["accuracy"]
                elif key in base:
                    row["accuracy_fp32"] = base[key]
                    row["diff_points"] = round(100 * (r["accuracy"] - base[key]), 3)
                    worst = max(worst, abs(row["diff_points"]))
                append_row(writer, row)
                print(f"  {precision:5s} {r['defense'][:24]:24s} {r['threat_model']:24s} {r['attack']:10s} eps "
                      f"{(r.get('eps') or 0) * 255:5.1f}/255 n {r['n']:4d}  acc {100 * r['accuracy']:6.2f} %"
                      + (f"  ({row['diff_points']:+.2f} vs fp32)" if "diff_points" in row else ""), flush=True)
    verdict = ("bf16 moves every row by <= 1 point: AUTO_PRECISION['cuda'] may become 'bf16'" if worst <= 1.0
               else f"bf16 moves a row by {worst:.2f} points: keep AUTO_PRECISION['cuda'] = 'fp32'")
    if args.dry_run:
        verdict = "dry run (untrained models): no verdict"
    writer.finish(wall_s=round(time.time() - t0, 1), max_abs_diff_points=worst, verdict=verdict)
    print(verdict)
    print(f"wrote {writer.json_path} and {writer.csv_path}")


if __name__ == "__main__":
    main()
