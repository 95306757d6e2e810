"""The ``gpumix`` command: bench, kernels, preview, info.

    gpumix bench            loader throughput vs torchvision/timm and DALI
    gpumix kernels          kernel micro-benchmark (benchmarks/kernels.py)
    gpumix preview          PNG grid of mixed samples with their soft targets
    gpumix info             versions, CUDA, and what device="auto" picks

With no ``--data`` the built-in dataset is used (gpumix.datasets: generated
photo-like JPEGs, cached under ``$GPUMIX_CACHE`` or ``~/.cache/gpumix``).
The command only parses arguments and calls benchmarks/ and the public API.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

BUILTIN = {"full": dict(num_classes=10, per_class=64, size=(375, 500)),
           "quick": dict(num_classes=4, per_class=12, size=(120, 160))}


def builtin_dataset(quick: bool = False) -> Path:
    """Path of the built-in dataset, generated on first use."""
    from gpumix.datasets import make_image_folder

    spec = BUILTIN["quick" if quick else "full"]
    setting = os.environ.get("GPUMIX_CACHE", "").strip()  # empty: unset
    cache = Path(os.path.expanduser(setting)) if setting else Path.home() / ".cache" / "gpumix"
    h, w = spec["size"]
    root = cache / f"builtin-{spec['num_classes']}x{spec['per_class']}-{h}x{w}"
    try:
        return make_image_folder(root, spec["num_classes"], spec["per_class"], spec["size"])
    except ValueError:  # gpumix's own folder, left unfinished by an older version: remade
        shutil.rmtree(root)
        return make_image_folder(root, spec["num_classes"], spec["per_class"], spec["size"])


def _data_folder(args) -> Path:
    if args.data is None:
        print("using the built-in dataset (generated once, then cached)", file=sys.stderr)
        return builtin_dataset(args.quick)
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"gpumix: --data {str(data)!r} is not a folder")
    return data


def _integer(low: int, kind: str):
    """An argparse type: an int of at least ``low`` (``kind`` names the range)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a {kind} integer, got {text}")
        return value

    return parse


_positive, _seed = _integer(1, "positive"), _integer(0, "non-negative")


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def _output_folder(path) -> Path:
    """``path`` made (with its parents) before any work, so a folder that
    cannot be written fails at once, not after the measurements."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out: cannot write into {str(folder)!r} ({error.strerror})") from error
    return folder


def environment() -> dict:
    import platform

    from gpumix.benchmarks.kernels import environment as kernel_environment
    from gpumix.backend import resolve_device

    env = kernel_environment()
    versions = {}
    for module in ("nvidia.dali", "cupy", "torchvision", "timm"):
        try:
            versions[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as error:  # a missing optional package is reported, not fatal
            versions[module] = f"unavailable ({type(error).__name__})"
    from gpumix.kernels._launch import cpu_workers

    choice = resolve_device("auto")
    return {**env, **versions, "platform": platform.platform(),
            "cpu_kernel_threads": cpu_workers(),
            "auto_device": choice.device, "auto_device_reason": choice.reason}


def cmd_info(args) -> int:
    for key, value in environment().items():
        print(f"{key:>20}: {value}")
    return 0


def cmd_bench(args) -> int:
    from tqdm import tqdm

    from gpumix.benchmarks import throughput
    from gpumix.backend import resolve_device
    from gpumix.pipelines import dataset_files

    data = _data_folder(args)
    _, _, classes = dataset_files(data)
    known = [c.key for c in throughput.configurations(None)]
    unknown = [key for key in args.only or () if key not in known]
    if unknown:
        raise ValueError(f"--only: unknown configuration {', '.join(unknown)}; the keys are "
                         f"{' '.join(known)}")
    out = _output_folder(args.out)
    if args.quick:
        args.batches, args.repeats, args.warmup, args.settle = 2, 2, 1, 0.0
        args.batch_size = min(args.batch_size, 16)
        args.size = min(args.size, 96)
    settings = argparse.Namespace(data=str(data), batch_size=args.batch_size, size=args.size,
                                  threads=args.threads, device=resolve_device(args.device).device,
                                  num_classes=len(classes), batches=args.batches,
                                  repeats=args.repeats, warmup=args.warmup,
                                  settle=args.settle)
    rows = throughput.run(settings, only=args.only, progress_factory=tqdm)
    print(throughput.format_table(rows))
    paired = throughput.paired_ratios(rows)
    print(throughput.format_paired(paired))
    report = {"command": " ".join(["gpumix"] + sys.argv[1:]),
              "settings": {k: v for k, v in vars(settings).items()},
              "environment": environment(), "results": rows, "paired_ratios": paired}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    title = (f"batch {settings.batch_size}, {settings.size} px, {settings.threads} threads, "
             f"{settings.device}")
    throughput.plot(rows, out / "bench.png", title)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


def cmd_kernels(args) -> int:
    from gpumix.benchmarks import kernels

    argv = ["--json", str(_output_folder(args.out) / "kernels.json")] + \
        (["--quick"] if args.quick else [])
    kernels.main(argv)
    return 0


def cmd_preview(args) -> int:
    from gpumix.benchmarks.preview import write_preview

    data = _data_folder(args)
    out = Path(args.out)
    if out.suffix.lower() != ".png":  # the picture is a PNG whatever the name says
        out = out.with_name(out.name + ".png")
    _output_folder(out.parent)
    path = write_preview(data, out, columns=args.columns, size=args.size, seed=args.seed)
    print(f"wrote {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="gpumix", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="end-to-end loader throughput")
    bench.add_argument("--data", help="ImageNet-style folder (default: built-in dataset)")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    bench.add_argument("--batch-size", type=_positive, default=64)
    bench.add_argument("--threads", type=_positive, default=2,
                       help="DALI threads = DataLoader workers")
    bench.add_argument("--size", type=_positive, default=224)
    bench.add_argument("--batches", type=_positive, default=10, help="batches per timed pass")
    bench.add_argument("--repeats", type=_positive, default=7, help="timed passes")
    bench.add_argument("--warmup", type=_positive, default=3, help="untimed batches first")
    bench.add_argument("--settle", type=_seconds, default=1.0,
                       help="seconds of pause after each pass (loaders refill their queues)")
    bench.add_argument("--only", nargs="+",
                       help="configuration keys (a a0 b c d-mixup ...; e-resizemix, "
                            "e-smoothmix, e-gridmix and e-saliencymix run only when named)")
    bench.add_argument("--quick", action="store_true", help="tiny run (tests, smoke checks)")
    bench.add_argument("--out", default="results", help="folder for bench.json and bench.png")
    bench.set_defaults(run=cmd_bench)

    kernels = sub.add_parser("kernels", help="kernel micro-benchmark")
    kernels.add_argument("--quick", action="store_true")
    kernels.add_argument("--out", default="results")
    kernels.set_defaults(run=cmd_kernels)

    preview = sub.add_parser("preview", help="PNG grid of mixed samples")
    preview.add_argument("--data", help="ImageNet-style folder (default: built-in dataset)")
    preview.add_argument("--out", default="results/preview.png",
                         help="PNG file to write (.png is added when missing)")
    preview.add_argument("--columns", type=_positive, default=6)
    preview.add_argument("--size", type=_positive, default=160)
    preview.add_argument("--seed", type=_seed, default=0)
    preview.add_argument("--quick", action="store_true", help="use the small built-in dataset")
    preview.set_defaults(run=cmd_preview)

    info = sub.add_parser("info", help="versions and device choice")
    info.set_defaults(run=cmd_info)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        # bad data or arguments: one clear line, not a traceback
        print(f"gpumix {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
