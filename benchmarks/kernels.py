"""Kernel micro-benchmark (CPU here; the same kernels run on CUDA):

* MixUp and CutMix CPU kernels on a (B, 3, H, W) batch, uint8 and float32,
  against NumPy's copy bandwidth for the same bytes: a copy moves 2 x the
  batch (read + write), MixUp 3 x (two reads, one write), CutMix 2 x;
* gpumix.torch.Mixup against timm's Mixup on the same float32 CPU tensor;
* per-sample FMix masks for the batch (one FFT call + selection) against
  looping the published per-mask function B times.

Run: ``python -m benchmarks.kernels [--quick] [--json PATH]``. Prints a table
and writes JSON with the machine, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np


def timeit(fn, repeats: int, warmup: int = 2) -> dict:
    """Median and spread (min, max) of ``repeats`` timed calls, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats}


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


def bench_cpu_kernels(batch: int, size: int, repeats: int) -> list[dict]:
    import gpumix
    from gpumix.config import CUTMIX, MIXUP
    from gpumix.params import MixParams

    rows = []
    rng = np.random.default_rng(0)
    pair = np.arange(batch)[::-1].copy()
    lam = rng.uniform(0.2, 0.8, batch).astype(np.float32)
    box = np.tile(np.array([[size // 4, 3 * size // 4, size // 4, 3 * size // 4]]), (batch, 1))
    for dtype in (np.uint8, np.float32):
        x = rng.integers(0, 256, (batch, 3, size, size)).astype(dtype)
        out = np.empty_like(x)
        copy = timeit(lambda: np.copyto(out, x), repeats)
        copy_bw = 2 * x.nbytes / copy["median_s"]
        for name, method, moved in (("mixup", MIXUP, 3), ("cutmix", CUTMIX, 2)):
            params = MixParams(pair=pair, lam=lam, method=np.full(batch, method, np.int8),
                               box=box if method == CUTMIX else np.zeros((batch, 4), np.int64))
            t = timeit(lambda: gpumix.mix_images(x, params, "NCHW", out=out), repeats)
            bw = moved * x.nbytes / t["median_s"]
            rows.append({"case": f"cpu {name} {np.dtype(dtype).name}", **t,
                         "bandwidth_GBps": bw / 1e9, "copy_bandwidth_GBps": copy_bw / 1e9,
                         "fraction_of_copy": bw / copy_bw})
    return rows


def bench_against_timm(batch: int, size: int, repeats: int) -> list[dict]:
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
        t_timm = timeit(lambda: timm_mix(work, y), repeats)
        t_ours = timeit(lambda: ours(work, y), repeats)
        rows.append({"case": f"torch {name} float32: gpumix vs timm", **t_ours,
                     "timm_median_s": t_timm["median_s"],
                     "speedup_vs_timm": t_timm["median_s"] / t_ours["median_s"]})
    return rows


def bench_fmix(batch: int, size: int, repeats: int) -> list[dict]:
    import gpumix
    from benchmarks import published_fmix

    config = gpumix.MixConfig(mixup_alpha=0.0, fmix_alpha=1.0, mode="elem")
    rng = np.random.default_rng(0)
    ours = timeit(lambda: gpumix.sample(config, batch, (size, size), rng), repeats)
    np.random.seed(0)
    loop = timeit(lambda: [published_fmix.sample_mask(1.0, 3.0, (size, size))
                           for _ in range(batch)], max(2, repeats // 3), warmup=1)
    return [{"case": f"fmix {batch} per-sample masks: gpumix vs published loop", **ours,
             "published_median_s": loop["median_s"],
             "speedup_vs_published": loop["median_s"] / ours["median_s"]}]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'case':<52} {'median ms':>10} {'min-max ms':>16}  result"]
    for r in rows:
        spread = f"{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}"
        if "fraction_of_copy" in r:
            result = (f"{r['bandwidth_GBps']:.1f} GB/s = {r['fraction_of_copy']:.0%} of copy "
                      f"({r['copy_bandwidth_GBps']:.1f} GB/s)")
        elif "speedup_vs_timm" in r:
            result = f"{r['speedup_vs_timm']:.1f}x timm ({r['timm_median_s'] * 1e3:.2f} ms)"
        else:
            result = (f"{r['speedup_vs_published']:.1f}x published "
                      f"({r['published_median_s'] * 1e3:.1f} ms)")
        lines.append(f"{r['case']:<52} {r['median_s'] * 1e3:>10.2f} {spread:>16}  {result}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats")
    parser.add_argument("--json", type=Path, default=Path("results/kernels.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.size, args.repeats = 8, 64, 3
    rows = (bench_cpu_kernels(args.batch_size, args.size, args.repeats)
            + bench_against_timm(args.batch_size, args.size, args.repeats)
            + bench_fmix(args.batch_size, args.size, args.repeats))
    report = {"settings": {"batch_size": args.batch_size, "size": args.size,
                           "repeats": args.repeats, "device": "cpu"},
              "environment": environment(), "results": rows}
    print(format_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
