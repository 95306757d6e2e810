#!/usr/bin/env bash
# Every GPU figure of the fast path in one run, each printed with its target.
# On a fresh CUDA machine with this repository (and, where there is no package
# index, DALI carried in as ../shared/gpu/stage_dali.sh prepares it):
#   bash benchmarks/gpu_check.sh            (about 6 minutes on an H100/H200)
# Writes its JSON to ${OUT:-results}/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results}/gpu_check"; mkdir -p "$out"
py=${PYTHON:-python3}
# Install what is missing without touching what the machine has (torch, CuPy).
$py -c "import gpumix" 2>/dev/null || $py -m pip install -q --no-deps --no-build-isolation -e . \
  || $py -m pip install -q --no-deps -e .
for wheel in /tmp/dali/*.whl; do [ -e "$wheel" ] && $py -m pip install -q --no-deps "$wheel"; done
$py -c "import numba.cuda, cupy, torch; assert torch.cuda.is_available(); print('GPU:', torch.cuda.get_device_name())" || exit 1

echo "== CUDA tests (pytest -m cuda): target all pass"
timeout 240 $py -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tail -5

echo "== host path with launches recorded: target <= 80 us per call"
$py -m gpumix.benchmarks.host_path --json "$out/host_path.json"

echo "== GPU kernels: hand-off <= 30 us (batch 64, uint8 HWC -> float32 NCHW); Mixup host <= 80 us, GPU <= 60 us, zero syncs"
timeout 180 $py -m gpumix.benchmarks.gpu_kernels --json "$out/gpu_kernels.json" 2>&1 | tail -25

if $py -c "import nvidia.dali" 2>/dev/null; then
  echo "== loader (gpumix bench --device gpu --threads 4): e-mixcut >= 0.95x c and >= 1.0x c-dali, >= 1.3x d-mixup, >= 1.5x d-cutmix; e-fmix >= 0.85x c"
  timeout 240 $py -m gpumix.cli bench --device gpu --threads 4 --out "$out" 2>&1 | tail -25
else
  echo "== loader: skipped, DALI is not installed (carry it with ../shared/gpu/stage_dali.sh)"
fi
