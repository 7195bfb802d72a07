"""What the strict adaptive preset costs per image: one PGD step (EOT 1) through MAE-Pure and the
classifier, timed, then scaled to the preset's 200 steps x EOT 20.

The attack's gradient goes through every one of MAE-Pure's S purification steps, so one attack step
costs S MAE forward+backward passes on the masked batch; the preset multiplies that by 4000.

    OMP_NUM_THREADS=2 python3 bench/strict_attack_cost.py --device cpu        # -> bench/results/strict_cost_cpu.json
    python3 bench/strict_attack_cost.py --device cuda                          # -> bench/results/strict_cost_cuda.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from maep_fast.evaluate import STRICT_EOT, STRICT_STEPS
from maep_fast.models.classifiers import SmallCNN
from maep_fast.models.presets import create_mae
from maep_fast.purify.maep import PurifiedClassifier
from maep_fast.purify.mae_pure import MAEPure

ROOT = Path(__file__).resolve().parents[1]


def time_attack_step(defended, x, y, repeats: int, sync) -> float:
    """Median seconds of one attack step (forward + input gradient) on the batch."""
    times = []
    for _ in range(repeats + 1):
        xa = x.clone().requires_grad_(True)
        sync()
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(defended(xa), y, reduction="sum")
        torch.autograd.grad(loss, xa)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--purify-steps", default="50,150", help="MAE-Pure S values (demo: 50, paper: 150)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    mae = create_mae("demo", img_size=16).to(dev).eval()
    clf = SmallCNN(in_chans=1, num_classes=10).to(dev).eval()
    x = torch.rand(a.batch, 1, 16, 16, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    rows = []
    for s in (int(v) for v in a.purify_steps.split(",")):
        pur = MAEPure(mae, steps=s, step_size=4 / 255, eta=32 / 255, mask_ratio=0.5)
        step_s = time_attack_step(PurifiedClassifier(pur, clf).eval(), x, y, a.repeats, sync)
        per_image = step_s / a.batch * STRICT_STEPS * STRICT_EOT
        rows.append({"purify_steps": s, "batch": a.batch, "attack_step_s": round(step_s, 4),
                     "strict_s_per_image": round(per_image, 1),
                     "strict_h_per_360_images": round(per_image * 360 / 3600, 2)})
        print(json.dumps(rows[-1]), flush=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    res = {"what": f"strict preset (PGD-{STRICT_STEPS}, EOT {STRICT_EOT}) through MAE-Pure + SmallCNN, demo MAE preset, "
                   "16x16 grayscale; time of one attack step scaled by steps x EOT",
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)",
           "torch": torch.__version__, "git": sha, "rows": rows}
    out = Path(a.out or ROOT / "bench" / "results" / f"strict_cost_{dev.type}.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
