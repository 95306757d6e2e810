"""CUDA kernel micro-benchmark (needs a GPU; benchmarks/GPU.md has the targets).

For a (B, 3, H, W) batch on the GPU, timed with CUDA events over back-to-back
calls on torch's current stream:

* the device-to-device copy of the same bytes (torch ``copy_``): the
  bandwidth ceiling each mixing kernel is compared with;
* ``gpumix.mix_images`` for MixUp, CutMix and FMix (uint8 NHWC and float32
  NCHW), parameters uploaded per call as a user's code would;
* the FMix masks of a batch on the device (spectra from keys, cuFFT,
  selection kernel);
* ``gpumix.torch.Mixup`` against timm's ``Mixup`` on the same CUDA float32
  tensor (both draw on the host each call).

Run: ``python -m gpumix.benchmarks.gpu_kernels [--json PATH]``.
"""

from __future__ import annotations

import statistics

import numpy as np

COPY_MOVES = 2  # bytes moved per byte of batch: read + write


def _events_per_call(fn, calls: int, repeats: int) -> list[float]:
    """Seconds per call, one figure per repeat of ``calls`` back-to-back calls."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return times


def _row(case: str, times: list[float], **extra) -> dict:
    return {"case": case, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), **extra}


def _params(batch: int, size: int, method: int, rng):
    from gpumix.config import CUTMIX, FMIX
    from gpumix.params import MixParams

    lam = rng.uniform(0.2, 0.8, batch).astype(np.float32)
    box = np.tile(np.array([[size // 4, 3 * size // 4, size // 4, 3 * size // 4]]), (batch, 1))
    mask = None
    if method == FMIX:
        import cupy as cp

        mask = cp.asarray(rng.random((batch, size, size)) < 0.5, dtype=cp.float32)
    return MixParams(pair=np.arange(batch)[::-1].copy(), lam=lam,
                     method=np.full(batch, method, np.int8),
                     box=box if method == CUTMIX else np.zeros((batch, 4), np.int64), mask=mask)


def bench_mixing(batch: int, size: int, calls: int, repeats: int) -> list[dict]:
    import torch

    import gpumix
    from gpumix.config import CUTMIX, FMIX, MIXUP

    rng = np.random.default_rng(0)
    rows = []
    for dtype, layout in ((torch.uint8, "NHWC"), (torch.float32, "NCHW")):
        shape = (batch, size, size, 3) if layout == "NHWC" else (batch, 3, size, size)
        x = torch.randint(0, 256, shape, device="cuda").to(dtype)
        out = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        copy = _events_per_call(lambda: out.copy_(x), calls, repeats)
        copy_gbps = COPY_MOVES * nbytes / statistics.median(copy) / 1e9
        rows.append(_row(f"copy {layout} {dtype}", copy, bandwidth_GBps=copy_gbps))
        # bytes each kernel must move, in batches: MixUp two reads + a write,
        # CutMix one read + a write, FMix two reads + a write + a float32 mask
        for name, method, moved in (("mixup", MIXUP, 3), ("cutmix", CUTMIX, 2),
                                    ("fmix mix", FMIX, 3 + 4 * size * size / (nbytes / batch))):
            params = _params(batch, size, method, rng)
            t = _events_per_call(lambda: gpumix.mix_images(x, params, layout, out=out),
                                 calls, repeats)
            gbps = moved * nbytes / statistics.median(t) / 1e9
            rows.append(_row(f"gpumix {name} {layout} {dtype}", t, bandwidth_GBps=gbps,
                             fraction_of_copy=gbps / copy_gbps))
    return rows


def bench_fmix_masks(batch: int, size: int, calls: int, repeats: int) -> list[dict]:
    from gpumix import fmix

    make = fmix.cuda_mask_maker((size, size), 3.0)
    keys = np.arange(1, batch + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15 >> 2)
    k = np.random.default_rng(0).integers(1, size * size, batch)
    t = _events_per_call(lambda: make(keys, k, k), calls, repeats)
    return [_row(f"fmix {batch} masks {size}x{size} on device", t)]


def bench_handoff(batch: int, size: int, calls: int, repeats: int) -> list[dict]:
    """gpumix.torch.apply on CUDA: uint8 HWC -> float32 NCHW, MixUp/CutMix per sample."""
    import torch

    import gpumix
    from gpumix.params import to_table
    from gpumix.torch import apply

    config = gpumix.MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=1000)
    params = gpumix.sample(config, batch, (size, size), np.random.default_rng(0))
    rows = to_table(params, (size, size), config)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device="cuda")
    return [_row("hand-off apply uint8 HWC -> float32 NCHW (target <= 30 us)",
                 _events_per_call(lambda: apply(images, rows), calls, repeats))]


def bench_torch_module(batch: int, size: int, calls: int, repeats: int) -> list[dict]:
    import torch
    from timm.data.mixup import Mixup as TimmMixup

    import gpumix.torch

    x = torch.rand(batch, 3, size, size, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    rows = []
    for name, kwargs in (("mixup batch", dict(mixup_alpha=0.8)),
                         ("cutmix batch", dict(mixup_alpha=0.0, cutmix_alpha=1.0))):
        ours = gpumix.torch.Mixup(**kwargs, num_classes=1000, seed=0)
        theirs = TimmMixup(**kwargs, num_classes=1000)
        t_ours = _events_per_call(lambda: ours(x, y), calls, repeats)
        t_timm = _events_per_call(lambda: theirs(x, y), calls, repeats)
        rows.append(_row(f"torch {name}: gpumix vs timm", t_ours,
                         timm_median_s=statistics.median(t_timm),
                         speedup_vs_timm=statistics.median(t_timm) / statistics.median(t_ours)))
    for name, kwargs in (("mixup elem", dict(mixup_alpha=0.8, mode="elem")),
                         ("cutmix elem", dict(mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem")),
                         ("fmix elem", dict(mixup_alpha=0.0, fmix_alpha=1.0, mode="elem"))):
        ours = gpumix.torch.Mixup(**kwargs, num_classes=1000, seed=0)
        rows.append(_row(f"torch {name}: gpumix", _events_per_call(lambda: ours(x, y), calls,
                                                                   repeats)))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'case':<46} {'median us':>10} {'min-max us':>16}  result"]
    for r in rows:
        spread = f"{r['min_s'] * 1e6:.0f}-{r['max_s'] * 1e6:.0f}"
        result = ""
        if "fraction_of_copy" in r:
            result = f"{r['bandwidth_GBps']:.0f} GB/s = {r['fraction_of_copy']:.0%} of copy"
        elif "bandwidth_GBps" in r:
            result = f"{r['bandwidth_GBps']:.0f} GB/s"
        elif "speedup_vs_timm" in r:
            result = f"{r['speedup_vs_timm']:.1f}x timm ({r['timm_median_s'] * 1e6:.0f} us)"
        lines.append(f"{r['case']:<46} {r['median_s'] * 1e6:>10.1f} {spread:>16}  {result}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    import torch

    from gpumix.benchmarks.kernels import parser_for, write_report

    parser = parser_for(__doc__, 7, "results/gpu_kernels.json")
    parser.add_argument("--calls", type=int, default=50, help="back-to-back calls per repeat")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_kernels needs a CUDA GPU (torch.cuda.is_available() "
                         "is False); `gpumix kernels` measures the CPU kernels")
    sizes = (args.batch_size, args.size, args.calls, args.repeats)
    rows = bench_mixing(*sizes) + bench_handoff(*sizes) + bench_fmix_masks(*sizes) \
        + bench_torch_module(*sizes)
    settings = {"batch_size": args.batch_size, "size": args.size, "calls": args.calls,
                "repeats": args.repeats, "device": torch.cuda.get_device_name()}
    return write_report(rows, settings, args.json, format_table(rows))


if __name__ == "__main__":
    main()
