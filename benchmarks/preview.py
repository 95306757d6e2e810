"""A picture of what gpumix does: one row per method (MixUp, CutMix, FMix,
ResizeMix, SmoothMix, GridMix, SaliencyMix), each sample captioned with lam
and its two largest soft-target classes; then beyond images: one video clip
as a strip of frames (a CutMix cuboid across time, so only a span of frames
is cut), and spectrograms cut in time bands."""

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


EXTRA_ROWS = ("Video", "Spectrogram")


def preview_size(columns: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for ``columns`` samples per row."""
    rows = len(METHODS) + len(EXTRA_ROWS)
    return (round(columns * CELL_INCHES[0] * DPI), round(rows * CELL_INCHES[1] * DPI))


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
    fig, axes = plt.subplots(len(METHODS) + len(EXTRA_ROWS), columns,
                             figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
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
    clean, _ = next(iter(DALIMixLoader(data, batch_size=2, size=size, prob=0.0, seed=seed,
                                       device="cpu")))
    _video_row(axes[len(METHODS)], clean, seed)
    _spectrogram_row(axes[len(METHODS) + 1], seed)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.08, hspace=0.6, wspace=0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _titled(ax, title: str, text: str) -> None:
    ax.axis("off")
    if title:
        ax.set_title(title, loc="left", fontsize=9, fontweight="bold")
    ax.text(0.5, -0.04, text, transform=ax.transAxes, ha="center", va="top", fontsize=7)


def _video_row(axes, images, seed: int) -> None:
    """Two clips panning across two of the loader's images, one frame per
    column, mixed by a CutMix cuboid over (T, H, W): frames outside its
    span stay the first clip's."""
    import torch

    from gpumix.torch import Mixup

    frames, size = len(axes), images.shape[-1]
    step = max(1, size // (4 * frames))
    sources = [images[k % len(images)] for k in (0, 1)]  # a one-image folder: itself twice
    clips = torch.stack([torch.stack([torch.roll(source, t * step, dims=-1)
                                      for t in range(frames)]) for source in sources]).contiguous()
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", five_d="video_3d",
                  num_classes=2, label_smoothing=0.0, seed=seed)
    mixed, targets = mixup(clips, torch.tensor([0, 1]))
    t0, t1 = mixup.last_params.box[0, :2]
    pictures = np.clip(mixed[0].permute(0, 2, 3, 1).numpy() * STD + MEAN, 0, 1)
    for t, ax in enumerate(axes):
        ax.imshow(pictures[t])
        inside = "in the cuboid" if t0 <= t < t1 else "untouched"
        text = f"frame {t}: {inside}"
        if t == 0:
            text = f"lam {float(mixup.last_params.lam[0]):.2f} (clip)\n" + text
        _titled(ax, "Video (cuboid over time)" if t == 0 else "", text)


def spectrograms(count: int, bins: int = 64, steps: int = 96, seed: int = 0) -> np.ndarray:
    """Log-magnitude spectrograms (count, 1, bins, steps) float32 of
    synthetic sounds (a rising chirp over a steady tone, differing per
    sample), from NumPy's FFT of windowed frames."""
    rng = np.random.default_rng(seed)
    hop, window = 64, np.hanning(2 * bins)
    t = np.arange(hop * steps + 2 * bins) / 8000.0
    out = np.empty((count, 1, bins, steps), np.float32)
    for i in range(count):
        f0, f1, tone = rng.uniform(200, 800), rng.uniform(1500, 3500), rng.uniform(300, 3000)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * t[-1]))
        sound = np.sin(phase) + 0.5 * np.sin(2 * np.pi * tone * t)
        frames = np.stack([sound[k * hop:k * hop + 2 * bins] * window for k in range(steps)])
        out[i, 0] = np.log1p(np.abs(np.fft.rfft(frames, axis=1))[:, :bins].T)
    return out


def _spectrogram_row(axes, seed: int) -> None:
    """Spectrograms (N, 1, F, T) mixed by CutMix time bands (cutmix_axes="width")."""
    import torch

    from gpumix.torch import Mixup

    x = torch.from_numpy(spectrograms(len(axes), seed=seed))
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", cutmix_axes="width",
                  num_classes=len(axes), label_smoothing=0.0, seed=seed)
    mixed, targets = mixup(x, torch.arange(len(axes)))
    for col, ax in enumerate(axes):
        ax.imshow(mixed[col, 0].numpy(), origin="lower", aspect="auto", cmap="magma")
        _titled(ax, "Spectrogram (time bands)" if col == 0 else "",
                caption(targets[col].numpy(), float(mixup.last_params.lam[col]), None))
