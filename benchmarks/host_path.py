"""Host time of the GPU fast path, measured without a GPU: every launch and
upload goes to a RecordingLauncher (gpumix.runtime), so what is timed is the
Python work a real call does before the device gets its work.

    handoff   gpumix.torch.apply's CUDA path for a batch (target <= 80 us)
    mixup     a CUDA gpumix.torch.Mixup call of MixUp/CutMix, modes "batch"
              and "elem": sampling, table, launch (target <= 80 us; timm's
              Mixup took 155 us on an H100 host); the call's input checks and
              its torch.empty for the targets are not included; then with
              FMix (its masks recorded as one step: the normals kernel, cuFFT
              and the selection), and with every method in mode "elem" (the
              SaliencyMix peaks also recorded as one step)

Run: ``python -m gpumix.benchmarks.host_path [--json PATH]``; prints the
median over repeats of the mean per call, with the launch count per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import gpumix
from gpumix import runtime
from gpumix.kernels import table_mix
from gpumix.params import to_table
from gpumix.torch import IMAGENET_MEAN, IMAGENET_STD, Mixup, _normalization, handoff_cuda, mix_cuda


def _per_call(fn, calls: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def bench(batch: int = 64, size: int = 224, calls: int = 200, repeats: int = 7) -> list[dict]:
    host = runtime.DeviceArray.on_host
    rows_out = []
    launcher = runtime.RecordingLauncher()
    options = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=1000)
    config = gpumix.MixConfig(**options)
    params = gpumix.sample(config, batch, (size, size), np.random.default_rng(0))
    rows = to_table(params, (size, size), config)
    images = host(np.zeros((batch, size, size, 3), np.uint8))
    out = host(np.zeros((batch, 3, size, size), np.float32))
    mean, inv_std = _normalization(IMAGENET_MEAN, IMAGENET_STD, 3)
    with runtime.use_launcher(launcher):
        def handoff():
            handoff_cuda(images, rows, mean, inv_std, True, out, 1, None, launcher)

        before = launcher.launch_count
        us = _per_call(handoff, calls, repeats)
        per_call = (launcher.launch_count - before) / (1 + calls * repeats)
        rows_out.append(dict(case="handoff", us_per_call=us, launches_per_call=per_call,
                             target_us=80))

        x = host(np.zeros((batch, 3, size, size), np.float32))
        labels, targets = host(np.zeros(batch, np.int64)), host(np.zeros((batch, 1000),
                                                                        np.float32))
        flag = runtime.DeviceArray.on_host(launcher.flag())
        cuda = torch.device("cuda")  # a device object only: nothing runs on it
        # The 80 us target is MixUp/CutMix's (timm's Mixup's methods); FMix and
        # every method are measured for reference, their mask work recorded.
        cases = [(f"mixup ({mode})", {**options, "mode": mode}, 80) for mode in ("batch", "elem")]
        cases.append(("mixup (elem, with FMix)", dict(options, fmix_alpha=1.0), None))
        cases.append(("mixup (elem, every method)", dict(
            options, method_weights=dict.fromkeys(gpumix.METHODS, 1.0), fmix_alpha=1.0,
            saliencymix_alpha=1.0), None))
        for case, mixup_options, target in cases:
            mixup = Mixup(label_smoothing=0.1, seed=0, **mixup_options)

            def mixup_call():
                p = mixup.sample_params(batch, (size, size), cuda)  # masks left to the launch
                table_rows = to_table(p, (size, size), mixup.config)
                by_pairs = not mixup.config.on("resizemix") and (
                    mixup.config.pairing == "flip" or table_mix.is_involution(p.pair))
                mix_cuda(x, x, table_rows, p, "NCHW", labels, targets, flag, mixup.config,
                         by_pairs, 1, None, launcher)

            before = launcher.launch_count
            us = _per_call(mixup_call, calls, repeats)
            per_call = (launcher.launch_count - before) / (1 + calls * repeats)
            rows_out.append(dict(case=case, us_per_call=us, launches_per_call=per_call,
                                 target_us=target))
    return rows_out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = bench()
    for row in rows:
        target = "no target" if row["target_us"] is None else f"target <= {row['target_us']}"
        print(f"{row['case']:>26}: {row['us_per_call']:7.1f} us per call ({target}), "
              f"{row['launches_per_call']:.1f} launches per call")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
