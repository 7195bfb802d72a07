"""docs/defense_tradeoff.png: oblivious vs adaptive PGD-20 accuracy of every MAEP recipe in
bench/results/maep_defended_cpu.jsonl (digits, L-inf 16/255, n = 360, torchattacks), with the issue's bars.

    python3 bench/plot_defense_tradeoff.py [--results FILE] [--out PNG]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# record name -> (label, group, label placement (dx, dy, ha) in points); groups: the recipes of the trade-off
# table, and the variants tried against it
RIGHT = (5, 4, "left")
POINTS = {
    "paper_loss30": ("paper loss", "recipe", RIGHT),
    "guided60_full": ("guided", "recipe", RIGHT),
    "guided60_then_def12_cf05": ("through itself, cf 0.5", "recipe", (4, 12, "left")),
    "guided60_then_def12_cf0.6": ("through itself, cf 0.6", "recipe", (6, -10, "left")),
    "guided60_then_def12_cf0.7": ("through itself, cf 0.7", "recipe", (6, -8, "left")),
    "def_ft12_cf03": ("through itself from stage 1, cf 0.3", "recipe", (-6, -3, "right")),
    "g60_deep42_def12_cf05": ("deeper, cf 0.5", "variant", (0, -14, "center")),
    "g60_deep42_def12_cf07": ("deeper, cf 0.7", "variant", (6, 6, "left")),
    "g60_def12_cf05_then_def12_cf05_pgd5": ("+12 ep PGD-5 (= eps 24/255)", "variant", (6, 2, "left")),
    "cascade_frozen_cf05": ("cascade, guided frozen", "variant", (-6, -12, "right")),
    "cascade_joint_cf05": ("cascade, joint", "variant", (0, 16, "center")),
    "g60_noise25_def12_cf05": ("input noise 0.25 (EOT 8)", "variant", (-6, -10, "right")),
    "g60_def12_cf05_eps24": ("", "variant", RIGHT),  # lands on the +12 ep PGD-5 point, which names both
    "g60_def12_cf05_mask025x2": ("random masks 0.25 x 2 (EOT 8)", "variant", (-100, -45, "right")),
    "g60_cf06_12_then_def12_cf0.6": ("24 ep", "longer", (6, -3, "left")),
    "g60_cf07_12_then_def12_cf0.7": ("24 ep", "longer", (6, -3, "left")),
    "g60_cf07_24_then_def12_cf0.7": ("36 ep", "longer", (6, -3, "left")),
    "g60_cf07_24_then_def24_cf0.7": ("cf 0.7, 48 ep", "longer", (8, 9, "left")),
}
# through-itself runs continued at the same classifier_frac: drawn as one path each, from 12 epochs on
SERIES = [["guided60_then_def12_cf0.6", "g60_cf06_12_then_def12_cf0.6"],
          ["guided60_then_def12_cf0.7", "g60_cf07_12_then_def12_cf0.7", "g60_cf07_24_then_def12_cf0.7",
           "g60_cf07_24_then_def24_cf0.7"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "bench/results/maep_defended_cpu.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "docs/defense_tradeoff.png"))
    a = ap.parse_args()
    recs = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    pts, no_def, clean, where = [], None, None, {}
    for r in recs:
        if r.get("name") not in POINTS or r.get("n") != 360:
            continue
        adaptive = next(v for k, v in r.items() if k.startswith("adaptive_pgd20"))
        label, group, place = POINTS[r["name"]]
        pts.append((label, group, r["oblivious_pgd20"], adaptive, place))
        where[r["name"]] = (r["oblivious_pgd20"], adaptive)
        no_def = no_def if no_def is not None else r.get("no_defense_pgd20")
        clean = clean if clean is not None else r.get("no_defense_clean")
    fig, ax = plt.subplots(figsize=(8, 5.6))
    colors = {"recipe": "tab:green", "variant": "tab:gray", "longer": "tab:blue"}
    for series in SERIES:
        path = [where[n] for n in series if n in where]
        ax.plot([p[0] for p in path], [p[1] for p in path], ls=":", lw=1, color=colors["longer"], zorder=2)
    for label, group, obl, adv, (dx, dy, ha) in pts:
        ax.scatter(obl, adv, s=40, color=colors[group], marker={"recipe": "o", "variant": "s"}.get(group, "D"),
                   zorder=3)
        far = abs(dx) + abs(dy) > 24  # a label set away from a crowded point gets a leader line
        ax.annotate(label, (obl, adv), textcoords="offset points", xytext=(dx, dy), fontsize=8, ha=ha,
                    arrowprops=dict(arrowstyle="-", lw=0.6, color="gray") if far else None)
    if no_def is not None:
        ax.scatter(no_def, no_def, marker="x", color="k", s=50, zorder=3)
        ax.annotate("no defense", (no_def, no_def), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axhline(no_def + 20, ls="--", color="gray", lw=0.8)
        ax.text(46, no_def + 20.8, "adaptive bar: no defense + 20", fontsize=7, color="gray")
    if clean is not None:
        ax.axvline(clean - 8, ls=":", color="gray", lw=0.8)
        ax.text(clean - 7.7, 30, "oblivious bar\n(undefended\nclean - 8)", fontsize=7, color="gray")
    ax.scatter([], [], color=colors["recipe"], label="recipes of the trade-off table")
    ax.scatter([], [], color=colors["variant"], marker="s", label="variants tried against the trade-off")
    ax.scatter([], [], color=colors["longer"], marker="D", label="through itself, trained longer at the same cf")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_xlim(44, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("oblivious PGD-20 accuracy (%)")
    ax.set_ylabel("adaptive PGD-20 accuracy (%)")
    ax.set_title("MAEP recipes, digits, L-inf 16/255, n = 360 (torchattacks)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out} ({len(pts)} points)")


if __name__ == "__main__":
    main()
