"""Kernel micro-benchmark (CPU here; the same kernels run on CUDA):

* MixUp and CutMix CPU kernels on a (B, 3, H, W) batch, uint8 and float32,
  against NumPy's copy bandwidth for the same bytes: a copy moves 2 x the
  batch (read + write), MixUp 3 x (two reads, one write), CutMix 2 x;
* gpumix.torch.Mixup against timm's Mixup on the same float32 CPU tensor;
* per-sample FMix masks for the batch (one FFT call + selection) against
  looping the published per-mask function B times;
* ResizeMix (nearest, bilinear), SmoothMix and GridMix applied to the batch
  against CutMix on the same batch (paired), the sampling of their params
  and masks, and SaliencyMix's saliency peaks for the whole batch;
* beyond images: MixUp and CutMix on video clips (16 x 16 frames x 3 x
  112 x 112, one box per clip) against NumPy's copy, and 3-D FMix masks
  (8 x 64^3) against 2-D masks of as many pixels (8 x 512^2).

Every comparison is timed in pairs: blocks of back-to-back calls of the
reference (the copy, timm, the published loop) and of gpumix alternate,
about 250 ms each, and the reported ratio is the median of the per-pair
ratios. A shared machine's speed can drift by 20% and more within a minute;
timing one side's calls and then the other's lets a slow phase land on one
side only (benchmarks/README.md).

Run: ``python -m gpumix.benchmarks.kernels [--quick] [--json PATH]``. Prints a table
and writes JSON with the machine, versions and commit. ``--quick`` is a smoke
run (a small batch, three pairs of 20 ms blocks): its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": len(times)}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


BLOCK_S = 0.25  # each side of a pair runs this long, in back-to-back calls
QUICK_BLOCK_S = 0.02  # --quick: a smoke run of the same timing


@dataclass(frozen=True)
class Pairing:
    """How comparisons are timed: ``pairs`` alternating blocks of each side,
    each about ``block_s`` seconds of back-to-back calls."""

    pairs: int
    block_s: float = BLOCK_S


def _calls_per_block(fn, block_s: float) -> int:
    return max(1, round(block_s / max(_time(fn), 1e-6)))


def _block(fn, calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def paired(fn, reference, pairing: Pairing) -> tuple[dict, dict, float]:
    """Time ``reference`` and ``fn`` in alternating blocks of back-to-back calls
    (about ``pairing.block_s`` each, so both run warm, as in a loop),
    ``pairing.pairs`` pairs:
    (per-call stats of fn, of reference, median over pairs of reference /
    fn). Alternating blocks cancel the machine's slow phases; single calls
    alternated would make each side start cold after the other."""
    fn(), reference()  # warm-up and compile
    calls_fn = _calls_per_block(fn, pairing.block_s)
    calls_ref = _calls_per_block(reference, pairing.block_s)
    ours, theirs = [], []
    for _ in range(pairing.pairs):
        theirs.append(_block(reference, calls_ref))
        ours.append(_block(fn, calls_fn))
    ratio = statistics.median(t / o for t, o in zip(theirs, ours))
    return _stats(ours), _stats(theirs), ratio


def environment() -> dict:
    import numba
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "torch": torch.__version__, "commit": commit}


def bench_cpu_kernels(batch: int, size: int, pairing: Pairing) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    pair = np.arange(batch)[::-1].copy()
    lam = rng.uniform(0.2, 0.8, batch).astype(np.float32)
    box = np.tile(np.array([[size // 4, 3 * size // 4, size // 4, 3 * size // 4]]), (batch, 1))
    for dtype in (np.uint8, np.float32):
        x = rng.integers(0, 256, (batch, 3, size, size)).astype(dtype)
        rows += _against_copy(x, f"{np.dtype(dtype).name}", pair, lam, box, pairing)
    return rows


def _against_copy(x, label: str, pair, lam, box, pairing: Pairing) -> list[dict]:
    """MixUp and CutMix of the NCHW batch ``x`` against NumPy's copy of it."""
    import gpumix
    from gpumix.config import CUTMIX, MIXUP
    from gpumix.params import MixParams

    rows = []
    out = np.empty_like(x)
    batch = x.shape[0]
    for name, method, moved in (("mixup", MIXUP, 3), ("cutmix", CUTMIX, 2)):
        params = MixParams(pair=pair, lam=lam, method=np.full(batch, method, np.int8),
                           box=box if method == CUTMIX else np.zeros((batch, 4), np.int64))
        t, copy, copy_over_mix = paired(
            lambda: gpumix.mix_images(x, params, "NCHW", out=out),
            lambda: np.copyto(out, x), pairing)
        rows.append({"case": f"cpu {name} {label}", **t,
                     "bandwidth_GBps": moved * x.nbytes / t["median_s"] / 1e9,
                     "copy_bandwidth_GBps": 2 * x.nbytes / copy["median_s"] / 1e9,
                     # bytes per second of the mix over those of the copy, per pair
                     "fraction_of_copy": copy_over_mix * moved / 2})
    return rows


def bench_beyond_images(pairing: Pairing, quick: bool = False) -> list[dict]:
    """Video clips against NumPy's copy; 3-D FMix masks against 2-D ones."""
    from gpumix import fmix

    clips, frames, side = (4, 4, 32) if quick else (16, 16, 112)
    count, cube = (2, 16) if quick else (8, 64)
    rng = np.random.default_rng(0)
    pair = np.arange(clips)[::-1].copy()
    lam = rng.uniform(0.2, 0.8, clips).astype(np.float32)
    box = np.tile(np.array([[side // 4, 3 * side // 4, side // 4, 3 * side // 4]]), (clips, 1))
    rows = []
    for dtype in (np.uint8, np.float32):  # one box per clip: frames x channels planes
        x = rng.integers(0, 256, (clips, frames * 3, side, side)).astype(dtype)
        rows += _against_copy(x, f"video {clips}x{frames}x3x{side}^2 {np.dtype(dtype).name}",
                              pair, lam, box, pairing)
    square = int(round(cube ** 1.5))  # as many pixels as the cube has voxels
    keys = rng.integers(0, 2**62, count)
    makers = {}
    for shape in ((cube,) * 3, (square, square)):
        n = int(np.prod(shape))
        half = np.full(count, n // 2)
        make = fmix.cpu_mask_maker(shape, 3.0)
        out = np.empty((count, *shape), np.float32)
        makers[len(shape)] = (lambda make=make, half=half, out=out: make(keys, half, half, out))
    t3, t2, two_over_three = paired(makers[3], makers[2], pairing)
    rows.append({"case": f"fmix 3-D masks {count}x{cube}^3 vs 2-D {count}x{square}^2", **t3,
                 "masks_2d_median_s": t2["median_s"], "over_2d": 1.0 / two_over_three,
                 "target_over_2d": 2.0})
    return rows


def bench_against_timm(batch: int, size: int, pairing: Pairing) -> list[dict]:
    import torch
    from timm.data.mixup import Mixup as TimmMixup

    import gpumix.torch

    rows = []
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    for name, kwargs in (("mixup", dict(mixup_alpha=0.8)),
                         ("cutmix", dict(mixup_alpha=0.0, cutmix_alpha=1.0))):
        timm_mix = TimmMixup(**kwargs, num_classes=1000)
        ours = gpumix.torch.Mixup(**kwargs, num_classes=1000, seed=0)
        work = x.clone()
        t_ours, t_timm, speedup = paired(lambda: ours(work, y), lambda: timm_mix(work, y),
                                         pairing)
        rows.append({"case": f"torch {name} float32: gpumix vs timm", **t_ours,
                     "timm_median_s": t_timm["median_s"], "speedup_vs_timm": speedup})
    return rows


def bench_fmix(batch: int, size: int, pairing: Pairing) -> list[dict]:
    import gpumix
    from gpumix.benchmarks import published_fmix

    config = gpumix.MixConfig(mixup_alpha=0.0, fmix_alpha=1.0, mode="elem")
    rng = np.random.default_rng(0)
    np.random.seed(0)
    ours, loop, speedup = paired(
        lambda: gpumix.sample(config, batch, (size, size), rng),
        lambda: [published_fmix.sample_mask(1.0, 3.0, (size, size)) for _ in range(batch)],
        pairing)
    return [{"case": f"fmix {batch} per-sample masks: gpumix vs published loop", **ours,
             "published_median_s": loop["median_s"], "speedup_vs_published": speedup}]


def bench_more_methods(batch: int, size: int, pairing: Pairing,
                       dtypes=(np.uint8, np.float32)):
    import gpumix
    from gpumix import saliency

    rows = []
    rng = np.random.default_rng(0)
    shape = (size, size)
    for dtype in dtypes:
        x = rng.integers(0, 256, (batch, 3, size, size)).astype(dtype)
        out = np.empty_like(x)
        cutmix = gpumix.sample(gpumix.MixConfig(mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem"),
                               batch, shape, rng)
        for name, options in (("resizemix nearest", dict(method_weights={"resizemix": 1})),
                              ("resizemix bilinear", dict(method_weights={"resizemix": 1},
                                                          resizemix_interpolation="bilinear")),
                              ("smoothmix", dict(method_weights={"smoothmix": 1})),
                              ("gridmix", dict(method_weights={"gridmix": 1}))):
            config = gpumix.MixConfig(mode="elem", **options)
            params = gpumix.sample(config, batch, shape, rng)
            t, t_cut, cut_over_ours = paired(
                lambda: gpumix.mix_images(x, params, "NCHW", out=out),
                lambda: gpumix.mix_images(x, cutmix, "NCHW", out=out), pairing)
            rows.append({"case": f"cpu {name} {np.dtype(dtype).name} vs cutmix", **t,
                         "cutmix_median_s": t_cut["median_s"],
                         "over_cutmix": 1.0 / cut_over_ours, "target_over_cutmix": 1.5})
            if dtype == np.uint8:
                times = [_time(lambda: gpumix.sample(config, batch, shape, rng))
                         for _ in range(pairing.pairs)]
                rows.append({"case": f"sample {name} params (masks too) x{batch}",
                             **_stats(times)})
    x = rng.integers(0, 256, (batch, size, size, 3), np.uint8)
    samples = np.arange(batch)
    saliency.host_centres(x, "NHWC", samples)
    times = [_time(lambda: saliency.host_centres(x, "NHWC", samples))
             for _ in range(pairing.pairs)]
    rows.append({"case": f"saliencymix peaks x{batch} (thumbnails + FFTs)", **_stats(times),
                 "target_s": 0.010})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'case':<52} {'median ms':>10} {'min-max ms':>16}  result"]
    for r in rows:
        spread = f"{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}"
        if "fraction_of_copy" in r:
            result = (f"{r['bandwidth_GBps']:.1f} GB/s = {r['fraction_of_copy']:.0%} of copy "
                      f"({r['copy_bandwidth_GBps']:.1f} GB/s)")
        elif "speedup_vs_timm" in r:
            result = f"{r['speedup_vs_timm']:.1f}x timm ({r['timm_median_s'] * 1e3:.2f} ms)"
        elif "over_cutmix" in r:
            result = (f"{r['over_cutmix']:.2f}x CutMix's time ({r['cutmix_median_s'] * 1e3:.2f} "
                      f"ms; target <= {r['target_over_cutmix']}x)")
        elif "over_2d" in r:
            result = (f"{r['over_2d']:.2f}x the 2-D masks' time ({r['masks_2d_median_s'] * 1e3:.1f}"
                      f" ms; target <= {r['target_over_2d']}x)")
        elif "target_s" in r:
            result = f"target <= {r['target_s'] * 1e3:.0f} ms"
        elif "speedup_vs_published" not in r:
            result = ""
        else:
            result = (f"{r['speedup_vs_published']:.1f}x published "
                      f"({r['published_median_s'] * 1e3:.1f} ms)")
        lines.append(f"{r['case']:<52} {r['median_s'] * 1e3:>10.2f} {spread:>16}  {result}")
    return "\n".join(lines)


def parser_for(doc: str, repeats: int, json_path: str) -> argparse.ArgumentParser:
    """The options both kernel benchmarks take (this one and gpu_kernels)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json", type=Path, default=Path(json_path))
    return parser


def write_report(rows: list[dict], settings: dict, path: Path, table: str) -> dict:
    """Print the table and write the JSON report (settings, machine, rows)."""
    report = {"settings": settings, "environment": environment(), "results": rows}
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return report


def main(argv=None) -> dict:
    parser = parser_for(__doc__, 15, "results/kernels.json")
    parser.add_argument("--quick", action="store_true",
                        help="small batch, few and short pairs (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.size, args.repeats = 8, 64, 3
    pairing = Pairing(args.repeats, QUICK_BLOCK_S if args.quick else BLOCK_S)
    rows = (bench_cpu_kernels(args.batch_size, args.size, pairing)
            + bench_against_timm(args.batch_size, args.size, pairing)
            + bench_fmix(args.batch_size, args.size, pairing)
            + bench_more_methods(args.batch_size, args.size, pairing,
                                 (np.uint8,) if args.quick else (np.uint8, np.float32))
            + bench_beyond_images(pairing, args.quick))
    settings = {"batch_size": args.batch_size, "size": args.size, "repeats": args.repeats,
                "block_s": pairing.block_s, "device": "cpu"}
    return write_report(rows, settings, args.json, format_table(rows))


if __name__ == "__main__":
    main()
