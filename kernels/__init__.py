"""gpumix kernels: one mixing operation per file, each as a NumPy reference,
a Numba CPU kernel and a Numba CUDA kernel sharing per-element logic
(gpumix.kernels._element). No randomness and no framework imports here: callers
pass the parameters (pairs, lam, boxes, masks) that gpumix.params samples.

    blend          MixUp                        (Zhang et al. 2018)
    box_paste      CutMix boxes                 (Yun et al. 2019)
    mask_mix       FMix, SmoothMix and GridMix masks, hard and soft (Harris et al. 2020)
    resize_paste   ResizeMix: the partner resized into a box (Qin et al. 2020)
    shape_mask     SmoothMix and GridMix masks from the table (Lee et al. 2020; Baek et al. 2021)
    saliency       SaliencyMix's grey thumbnails and box placement (Uddin et al. 2021)
    mask_select    FMix grey image -> mask by rank (threshold selection)
    normals        counter-based normals for the FMix spectra
    soft_targets   smoothed, mixed one-hot targets
    table          the params table: one row per sample, named columns
    table_mix      every method and the targets in one launch, from the table
    mix_normalize  mix, normalise and lay out in one pass (the hand-off to torch)
"""
