"""DALI-only baselines for the loader benchmark, as ``mixing=`` functions of
gpumix.pipelines.train_graph: HWC uint8 images and labels in, ``(images,
targets)`` out, built from DALI's own operators only (the graph then
normalises with ``crop_mirror_normalize``, as a stock DALI user would).

    stock       no mixing: smoothed one-hot targets
    mixup       batch_permutation + permute_batch + arithmetic
    cutmix      multi_paste of a box that lies inside the image
"""

from __future__ import annotations

import functools

from gpumix.dali import smoothed_one_hot


def stock(images, labels, *, num_classes, size, label_smoothing=0.1):
    """No mixing: the images as they are, smoothed one-hot targets."""
    return images, smoothed_one_hot(labels, num_classes, label_smoothing)


def _partner(images, labels, num_classes, label_smoothing):
    from nvidia.dali import fn

    perm = fn.batch_permutation()
    partner = fn.permute_batch(images, indices=perm)
    partner_labels = fn.permute_batch(labels, indices=perm)
    return (partner, smoothed_one_hot(labels, num_classes, label_smoothing),
            smoothed_one_hot(partner_labels, num_classes, label_smoothing))


def mixup(images, labels, *, num_classes, size, alpha=0.8, label_smoothing=0.1):
    """MixUp with one lam per sample, uint8 out (DALI's cast truncates)."""
    from nvidia.dali import fn, types

    partner, one_hot, partner_hot = _partner(images, labels, num_classes, label_smoothing)
    lam = fn.random.beta(alpha=alpha, beta=alpha)
    mixed = fn.cast(images * lam + partner * (1.0 - lam), dtype=types.UINT8)
    return mixed, one_hot * lam + partner_hot * (1.0 - lam)


def cutmix(images, labels, *, num_classes, size, alpha=1.0, label_smoothing=0.1):
    """CutMix with a box inside the image, lam = the realised pixel fraction."""
    from nvidia.dali import fn, math as dmath, types

    partner, one_hot, partner_hot = _partner(images, labels, num_classes, label_smoothing)
    h, w = size
    lam = fn.random.beta(alpha=alpha, beta=alpha)
    ratio = dmath.sqrt(1.0 - lam)
    cut_h = fn.cast(ratio * h, dtype=types.INT32)
    cut_w = fn.cast(ratio * w, dtype=types.INT32)
    y0 = dmath.min(fn.cast(fn.random.uniform(range=[0.0, 1.0]) * (h - cut_h + 1),
                           dtype=types.INT32), h - cut_h)
    x0 = dmath.min(fn.cast(fn.random.uniform(range=[0.0, 1.0]) * (w - cut_w + 1),
                           dtype=types.INT32), w - cut_w)
    zero = fn.cast(y0 * 0, dtype=types.INT32)
    anchors = fn.stack(fn.stack(zero, zero), fn.stack(y0, x0))
    shapes = fn.stack(fn.stack(zero + h, zero + w), fn.stack(cut_h, cut_w))
    mixed = fn.multi_paste(images, partner, in_anchors=anchors, out_anchors=anchors,
                           shapes=shapes)
    lam = 1.0 - fn.cast(cut_h * cut_w, dtype=types.FLOAT) / float(h * w)
    return mixed, one_hot * lam + partner_hot * (1.0 - lam)


def named(name: str, **options):
    """The baseline called ``name`` with its options bound."""
    return functools.partial({"stock": stock, "mixup": mixup, "cutmix": cutmix}[name],
                             **options)
