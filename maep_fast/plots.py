"""PNG figures: image grids (clean | adversarial | purified)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_comparison_grid(columns: dict[str, torch.Tensor], path: str | Path, max_rows: int = 8,
                         labels: dict[str, list] | None = None, true_labels: list | None = None) -> Path:
    """One column per entry of ``columns`` (each [N, C, H, W] in [0, 1]), one row per image.

    ``labels``: optional {column name: per-image predicted labels}; each image is captioned with its
    label ("pred 3"; the first column also shows the true label), in red where it differs from ``true_labels``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    n = min(max_rows, min(t.shape[0] for t in columns.values()))
    fig, axes = plt.subplots(n, len(names), figsize=(1.7 * len(names), (1.9 if labels else 1.6) * n), squeeze=False)
    for j, name in enumerate(names):
        for i in range(n):
            img = columns[name][i].detach().float().cpu().clamp(0, 1)
            ax = axes[i][j]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if labels and name in labels:
                pred = labels[name][i]
                wrong = true_labels is not None and str(pred) != str(true_labels[i])
                text = f"pred {pred}" if true_labels is None or j else f"true {true_labels[i]}, pred {pred}"
                ax.set_xlabel(text, fontsize=8, color="red" if wrong else "black")
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
