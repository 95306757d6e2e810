#!/usr/bin/env bash
# Every GPU figure of the fast path in one run, each printed with its target.
#
# On a CUDA machine with this repository and torch, CuPy, numba-cuda, pytest:
#   bash benchmarks/gpu_check.sh                 (about 6 minutes on an H100/H200)
# On a lent machine without a package index, carry DALI and a NumPy < 2.5
# first with ../shared/gpu/stage_dali.sh (its last carry line puts them on
# PYTHONPATH), then run this script in the same call. Without DALI the loader
# part is skipped and says so. Figures go to $OUT/gpu_check (or results/).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results}/gpu_check"; mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# gpumix importable as installed (gpumix.kernels, gpumix.benchmarks) without
# touching the machine's packages: an editable install when pip can, else
# links that stand in for the package-dir mapping (never committed).
if ! $py -c "import gpumix.kernels, gpumix.benchmarks" 2>/dev/null; then
  $py -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || { ln -sfn ../kernels gpumix/kernels; ln -sfn ../benchmarks gpumix/benchmarks; }
fi
$py - <<'EOF' || exit 1
import numba.cuda, cupy, torch, gpumix.kernels
assert torch.cuda.is_available(), "no CUDA device"
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| cupy", cupy.__version__)
EOF

echo "== CUDA tests (pytest -m cuda, sync-debug 'error' included): target all pass"
timeout 240 $py -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tail -8

echo "== host path, launches recorded: hand-off and Mixup <= 80 us per call, 1 launch"
$py -m gpumix.benchmarks.host_path --json "$out/host_path.json"

echo "== GPU kernels (CUDA events): hand-off <= 30 us for 64 x 224 x 224 uint8 HWC -> float32 NCHW;"
echo "   Mixup 64 x 3 x 224 x 224 float32 in place: GPU <= 60 us (timm's Mixup alongside)"
timeout 180 $py -m gpumix.benchmarks.gpu_kernels --json "$out/gpu_kernels.json" 2>&1 | tail -25

if $py -c "import nvidia.dali" 2>/dev/null; then
  echo "== loader, gpumix bench --device gpu --threads 4 (per-round paired medians):"
  echo "   e-mixcut >= 0.95x c and >= 1.0x c-dali, >= 1.3x d-mixup, >= 1.5x d-cutmix; e-fmix >= 0.85x c"
  timeout 240 $py -m gpumix.cli bench --device gpu --threads 4 --repeats 5 --out "$out" 2>&1 \
    | grep -av "it/s" | tail -20
  echo "== the other methods, gpumix bench --device gpu --threads 4 (issue 15):"
  echo "   e-resizemix, e-smoothmix, e-gridmix >= 0.9x c; e-saliencymix >= 0.7x c"
  timeout 120 $py -m gpumix.cli bench --device gpu --threads 4 --repeats 3 --out "$out/more" \
    --only c e-resizemix e-smoothmix e-gridmix e-saliencymix 2>&1 | grep -av "it/s" | tail -12
else
  echo "== loader: skipped, DALI is not importable (carry it with ../shared/gpu/stage_dali.sh)"
fi
