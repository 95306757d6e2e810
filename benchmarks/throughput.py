"""End-to-end loader throughput: gpumix against CPU loaders and DALI's own
building blocks, at equal CPU threads/workers, on the same JPEG folder.

Configurations (all: random-resized-crop to ``size``, horizontal flip,
normalisation, float32 NCHW batches with soft targets unless said):

    a  torchvision+timm Mixup       torch DataLoader (num_workers = threads),
                                    torchvision transforms, timm ``Mixup`` on
                                    each batch (what most training code runs)
    a0 torchvision (no mixing)      the same without mixing (reference)
    b  torchvision+timm FastCollate timm ``FastCollateMixup``: uint8 mixing in
                                    the collate, then normalisation
    c  gpumix loader (no mixing)    gpumix's pipeline with mixing off (its
                                    normalise step without the mixing)
    c-dali DALI stock (no mixing)   crop_mirror_normalize, what a DALI user
                                    would write
    d  DALI pure MixUp / CutMix     DALI-only mixing (batch_permutation,
                                    arithmetic, multi_paste)
    e  gpumix MixUp+CutMix / FMix   per-sample ("elem") mixing inside DALI

Timing: round-robin over configurations, ``repeats`` passes each; a pass
reads ``warmup`` untimed batches (at least 2 per thread + 1: a DataLoader
keeps 2 per worker ready), then times ``batches`` batches; images/s
per pass, median and min/max, and the speed-up against ``a``. CUDA work is
timed with CUDA events. Every loader refills its prefetch queue in the
background after its pass (DALI's pipeline, the DataLoader's workers), so
each pass is followed by a pause of ``settle`` seconds: otherwise that refill
runs during the next configuration's timed pass and is charged to it (and
after the loaders are built, before the first round). The gpumix loaders
drop the epoch's short last batch as the DataLoaders do (``drop_last``), and
gpumix's own CPU kernels get ``threads`` threads (``GPUMIX_NUM_THREADS``,
unless set), the budget the loaders have.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gpumix.benchmarks import baselines

from gpumix.pipelines import IMAGENET_MEAN, IMAGENET_STD

MEAN = tuple(m / 255 for m in IMAGENET_MEAN)  # torchvision normalises 0..1 values
STD = tuple(s / 255 for s in IMAGENET_STD)
MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)


@dataclass
class Config:
    key: str
    name: str
    make: Callable  # (settings) -> iterable of (images, targets)
    results: list = field(default_factory=list)
    optional: bool = False  # run only when named with --only


def _torch_loader(settings, collate=None, uint8=False):
    import torch
    from torchvision import datasets, transforms

    steps = [transforms.RandomResizedCrop(settings.size), transforms.RandomHorizontalFlip()]
    if uint8:
        steps.append(transforms.PILToTensor())
    else:
        steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    dataset = datasets.ImageFolder(settings.data, transform=transforms.Compose(steps))
    return torch.utils.data.DataLoader(
        dataset, batch_size=settings.batch_size, shuffle=True, num_workers=settings.threads,
        drop_last=True, persistent_workers=settings.threads > 0, collate_fn=collate,
        prefetch_factor=2 if settings.threads > 0 else None)


def torchvision_timm(settings, mix=True):
    from timm.data.mixup import Mixup

    loader = _torch_loader(settings)
    mixup = Mixup(**MIX, num_classes=settings.num_classes)

    def batches():
        for x, y in loader:
            yield mixup(x, y) if mix else (x, y)

    return batches


def torchvision_fast_collate(settings):
    import torch
    from timm.data.mixup import FastCollateMixup

    collate = FastCollateMixup(**MIX, num_classes=settings.num_classes)

    def collate_tensors(batch):  # FastCollateMixup wants uint8 numpy CHW arrays
        return collate([(img.numpy(), label) for img, label in batch])

    loader = _torch_loader(settings, collate=collate_tensors, uint8=True)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    def batches():
        for x, y in loader:
            yield (x.float() - mean) / std, y

    return batches


def dali_loader(settings, mixing, **options):
    """gpumix's loader with ``mixing`` "gpumix", "none" or a baseline of
    gpumix.benchmarks.baselines."""
    from gpumix.torch import DALIMixLoader

    # "drop", as the DataLoaders' drop_last: a short batch costs a full one's work
    loader = DALIMixLoader(settings.data, batch_size=settings.batch_size, size=settings.size,
                           num_threads=settings.threads, device=settings.device,
                           mixing=mixing, seed=0, last_batch_policy="drop", **options)
    return lambda: iter(loader)


def configurations(settings) -> list[Config]:
    both = dict(MIX, mode="elem")
    return [
        Config("a", "torchvision + timm Mixup", lambda s: torchvision_timm(s)),
        Config("a0", "torchvision (no mixing)", lambda s: torchvision_timm(s, mix=False)),
        Config("b", "torchvision + timm FastCollateMixup", torchvision_fast_collate),
        Config("c", "gpumix loader (no mixing)", lambda s: dali_loader(s, "none")),
        Config("c-dali", "DALI stock (no mixing)",
               lambda s: dali_loader(s, baselines.named("stock"))),
        Config("d-mixup", "DALI pure MixUp",
               lambda s: dali_loader(s, baselines.named("mixup", alpha=0.8))),
        Config("d-cutmix", "DALI pure CutMix",
               lambda s: dali_loader(s, baselines.named("cutmix", alpha=1.0))),
        Config("e-mixcut", "gpumix MixUp/CutMix (per sample)",
               lambda s: dali_loader(s, "gpumix", **both)),
        Config("e-fmix", "gpumix FMix (per-sample masks)",
               lambda s: dali_loader(s, "gpumix", mixup_alpha=0.0, fmix_alpha=1.0,
                                     mode="elem", label_smoothing=0.1)),
        *(Config(f"e-{name}", f"gpumix {title} (per sample)", _one_method(name, options),
                 optional=True) for name, title, options in MORE_METHODS),
    ]


MORE_METHODS = (("resizemix", "ResizeMix", {}), ("smoothmix", "SmoothMix", {}),
                ("gridmix", "GridMix", {}), ("saliencymix", "SaliencyMix",
                                             {"saliencymix_alpha": 1.0}))


def _one_method(name: str, options: dict):
    return lambda s: dali_loader(s, "gpumix", method_weights={name: 1.0}, mode="elem",
                                 label_smoothing=0.1, **options)


class _Clock:
    """Wall clock, or CUDA events when the batches live on a GPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self):
        if self.cuda:
            import torch

            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            import torch

            self._end.record()
            torch.cuda.synchronize()
            return self._begin.elapsed_time(self._end) / 1e3
        return time.perf_counter() - self._t0


def _take(iterator_factory, count: int, state: dict):
    """Next ``count`` batches from a cycling iterator; returns images seen."""
    seen = 0
    while seen < count:
        if state.get("it") is None:
            state["it"] = iter(iterator_factory())
        try:
            x, t = next(state["it"])
        except StopIteration:
            state["it"] = None
            continue
        state["last"] = (x, t)
        seen += 1
        state["images"] = state.get("images", 0) + x.shape[0]
    return state


def _rates_row(config: Config, rates: list[float], last) -> dict:
    x, t = last
    return {"key": config.key, "name": config.name, "images_per_s": statistics.median(rates),
            "min": min(rates), "max": max(rates), "rates": rates,
            "batch_shape": list(x.shape), "targets_shape": list(t.shape),
            "targets_row_sum": float(t.float().sum(1).mean()) if t.dim() == 2 else None}


def run(settings, only=None, progress_factory=None) -> list[dict]:
    """Measure every configuration, round-robin: pass r of every configuration
    runs before pass r + 1 of any, so slow drifts of a shared machine affect
    all alike. Each pass first reads ``warmup`` untimed batches, which drains
    whatever the loader prefetched while another configuration ran."""
    configs = [c for c in configurations(settings)
               if (c.key in only if only else not c.optional)]
    # gpumix's CPU kernels (FMix masks, saliency) get the loaders' thread budget
    os.environ.setdefault("GPUMIX_NUM_THREADS", str(settings.threads))
    # Untimed batches before each pass: at least every batch the loaders keep
    # ready (a DataLoader prefetches 2 per worker), so no pass starts ahead.
    warmup = max(settings.warmup, 2 * settings.threads + 1)
    states = {}
    for config in configs:  # build, compile and fill every loader once
        factory = config.make(settings)
        state = {"factory": factory}
        _take(factory, warmup, state)
        states[config.key] = state
    time.sleep(getattr(settings, "settle", 0.0))  # the last built refills before round 1
    bar = progress_factory(total=len(configs) * settings.repeats) if progress_factory else None
    rates = {c.key: [] for c in configs}
    for _ in range(settings.repeats):
        for config in configs:
            state = states[config.key]
            if bar is not None:
                bar.set_description(config.name)
            _take(state["factory"], warmup, state)
            x, _ = state["last"]
            clock = _Clock(getattr(x, "is_cuda", False))
            state["images"] = 0
            clock.start()
            _take(state["factory"], settings.batches, state)
            rates[config.key].append(state["images"] / clock.stop())
            if bar is not None:
                bar.update(1)
            time.sleep(getattr(settings, "settle", 0.0))
    if bar is not None:
        bar.close()
    rows = [_rates_row(c, rates[c.key], states[c.key]["last"]) for c in configs]
    base = next((r["images_per_s"] for r in rows if r["key"] == "a"), None)
    for r in rows:
        r["speedup_vs_a"] = r["images_per_s"] / base if base else None
    return rows


# The issues' targets compare gpumix against these (key, base) pairs.
PAIRS = (("e-mixcut", "c"), ("e-fmix", "c"), ("e-mixcut", "c-dali"), ("e-mixcut", "d-mixup"),
         ("e-mixcut", "d-cutmix"), ("e-mixcut", "a"), ("e-fmix", "a"),
         ("e-resizemix", "c"), ("e-smoothmix", "c"), ("e-gridmix", "c"), ("e-saliencymix", "c"))


def paired_ratios(rows: list[dict], pairs=PAIRS) -> list[dict]:
    """Throughput ratio ``key / base`` per round, for the pairs both measured:
    pass r of both ran in round r, minutes apart at most, so a slow phase of
    a shared machine that spans a round cancels out of that round's ratio
    (the ratio of the two medians pairs passes from different rounds). Each
    entry: key, base, median, min, max over rounds."""
    rates = {r["key"]: r["rates"] for r in rows}
    result = []
    for key, base in pairs:
        if key in rates and base in rates:
            ratios = [k / b for k, b in zip(rates[key], rates[base])]
            result.append({"key": key, "base": base, "median": statistics.median(ratios),
                           "min": min(ratios), "max": max(ratios)})
    return result


def format_paired(ratios: list[dict]) -> str:
    return "\n".join(f"{r['key']:>13} / {r['base']:<9} {r['median']:.3f} per-round median "
                     f"({r['min']:.3f}-{r['max']:.3f})" for r in ratios)


def format_table(rows: list[dict]) -> str:
    width = max([9] + [len(r["key"]) + 1 for r in rows])
    lines = [f"{'configuration':{width + 38}} {'images/s':>9} {'min-max':>15} {'vs a':>6}"]
    for r in rows:
        speed = f"{r['speedup_vs_a']:.2f}x" if r["speedup_vs_a"] else "-"
        lines.append(f"{r['key']:<{width}}{r['name']:38} {r['images_per_s']:>9.0f} "
                     f"{r['min']:>7.0f}-{r['max']:<7.0f} {speed:>6}")
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['key']}: {r['name']}" for r in rows]
    medians = np.array([r["images_per_s"] for r in rows])
    low = medians - np.array([r["min"] for r in rows])
    high = np.array([r["max"] for r in rows]) - medians
    colors = ["#4c72b0" if r["key"].startswith(("a", "b")) else
              "#55a868" if r["key"].startswith(("c", "d")) else "#c44e52" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    ax.barh(names[::-1], medians[::-1], xerr=[low[::-1], high[::-1]], color=colors[::-1])
    ax.set_xlabel("images / s (median, min-max)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
