"""A deterministic, built-in image-folder dataset: no download.

``make_image_folder(root, num_classes, per_class, size, seed)`` writes
``root/class_XX/img_YYYY.jpg``: smooth, photo-like RGB images (three FMix
low-frequency fields as colour channels, plus a class-dependent tint and
stripes so classes differ), saved as real JPEGs with Pillow. The same
arguments always give the same files; an existing complete folder is reused.
The files are written into a temporary folder beside ``root``, which is then
renamed into place: an interrupted run leaves no half folder, and of two
processes making the same folder at once one wins and the other reuses it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from gpumix import fmix


def _image(rng: np.random.Generator, label: int, num_classes: int, size) -> np.ndarray:
    h, w = size
    normals = rng.standard_normal((3, *fmix.frequency_shape((h, w)), 2)).astype(np.float32)
    fields = fmix.grey_images(normals, (h, w), decay_power=2.5)
    fields = (fields - fields.min(axis=(1, 2), keepdims=True))
    fields /= fields.max(axis=(1, 2), keepdims=True) + 1e-12
    hue = 2 * np.pi * label / num_classes
    tint = 0.5 + 0.5 * np.cos(hue + np.array([0.0, 2.1, 4.2]))
    yy = np.arange(h)[:, None] / h
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (label + 2) * yy + rng.uniform(0, 6.3))
    rgb = 0.55 * fields.transpose(1, 2, 0) + 0.3 * tint + 0.15 * stripes[..., None]
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def make_image_folder(root, num_classes: int = 10, per_class: int = 50, size=(256, 320),
                      seed: int = 0, quality: int = 90) -> Path:
    """Write (or reuse) the dataset; returns ``root``. ValueError when
    ``root`` already holds other files (another dataset, say): they are
    never mixed with these nor deleted."""
    from PIL import Image

    root = Path(root)
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"num_classes and per_class must be >= 1, got {num_classes}, "
                         f"{per_class}")
    marker = f".complete-{num_classes}-{per_class}-{size[0]}x{size[1]}-{seed}" + (
        "" if quality == 90 else f"-q{quality}")
    if (root / marker).exists():
        return root
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{str(root)!r} holds other files (another dataset, or one left "
                         f"unfinished): remove it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        rng = np.random.default_rng(seed)
        for label in range(num_classes):
            folder = staging / f"class_{label:02d}"
            folder.mkdir()
            for index in range(per_class):
                pixels = _image(rng, label, num_classes, size)
                Image.fromarray(pixels).save(folder / f"img_{index:04d}.jpg", quality=quality)
        (staging / marker).touch()
        staging.chmod(0o755)  # mkdtemp's folder is private; a cache may be shared
        try:
            if root.exists():
                root.rmdir()  # empty (checked above)
            os.rename(staging, root)
        except OSError:
            if not (root / marker).exists():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
