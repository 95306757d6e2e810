"""gpumix kernels: one mixing operation per file, each as a NumPy reference,
a Numba CPU kernel and a Numba CUDA kernel sharing per-element logic
(gpumix.kernels._element). No randomness and no framework imports here: callers
pass the parameters (pairs, lam, boxes, masks) that gpumix.params samples.

    blend        MixUp                        (Zhang et al. 2018)
    box_paste    CutMix boxes                 (Yun et al. 2019)
    mask_mix     FMix masks, hard and soft    (Harris et al. 2020)
    mask_select  FMix grey image -> mask by rank (threshold selection)
    soft_targets smoothed, mixed one-hot targets
"""
