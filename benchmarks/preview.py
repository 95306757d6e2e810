"""A picture of what gpumix does: one row per method (MixUp, CutMix, FMix,
ResizeMix, SmoothMix, GridMix, SaliencyMix), each sample captioned with lam
and its two largest soft-target classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpumix.pipelines import IMAGENET_MEAN, IMAGENET_STD

METHODS = {
    "MixUp": dict(mixup_alpha=1.0),
    "CutMix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "FMix": dict(mixup_alpha=0.0, fmix_alpha=1.0),
    "ResizeMix": dict(method_weights={"resizemix": 1.0}),
    "SmoothMix": dict(method_weights={"smoothmix": 1.0}),
    "GridMix": dict(method_weights={"gridmix": 1.0}),
    "SaliencyMix": dict(method_weights={"saliencymix": 1.0}, saliencymix_alpha=1.0),
}
MEAN = np.array(IMAGENET_MEAN) / 255  # on 0..1 values, as the loader's output
STD = np.array(IMAGENET_STD) / 255
CELL_INCHES = (2.0, 2.5)  # width, height per sample (image + caption)
DPI = 100


def preview_size(columns: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for ``columns`` samples per row."""
    return (round(columns * CELL_INCHES[0] * DPI), round(len(METHODS) * CELL_INCHES[1] * DPI))


def caption(targets: np.ndarray, lam: float, classes) -> str:
    top = np.argsort(-targets)[:2]
    parts = [f"{classes[k] if classes else k}: {targets[k]:.2f}" for k in top if targets[k] > 0]
    return f"lam {lam:.2f}\n" + "\n".join(parts)


def write_preview(data, out: Path, columns: int = 6, size: int = 160, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpumix.torch import DALIMixLoader

    width, height = preview_size(columns)
    fig, axes = plt.subplots(len(METHODS), columns, figsize=(width / DPI, height / DPI),
                             dpi=DPI, squeeze=False)
    for row, (name, options) in enumerate(METHODS.items()):
        loader = DALIMixLoader(data, batch_size=columns, size=size, mode="elem",
                               pairing="permutation", label_smoothing=0.0, seed=seed + row,
                               return_params=True, device="cpu", **options)
        images, targets, params = next(iter(loader))
        pictures = np.clip(images.permute(0, 2, 3, 1).numpy() * STD + MEAN, 0, 1)
        for col in range(columns):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(pictures):
                continue
            ax.imshow(pictures[col])
            ax.set_title(f"{name}" if col == 0 else "", loc="left", fontsize=9,
                         fontweight="bold")
            ax.text(0.5, -0.04, caption(targets[col].numpy(), float(params["lam"][col]),
                                        loader.classes),
                    transform=ax.transAxes, ha="center", va="top", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.08, hspace=0.6, wspace=0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
