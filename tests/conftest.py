"""Test layout (by contract, not by file):

    test_kernels_cpu.py    every CPU kernel against its NumPy reference
    test_ptx.py            every CUDA kernel compiles to PTX (sm_80, sm_90)
    test_semantics.py      invariants (hypothesis) and statistics of sampling
    test_against_timm.py   targets, boxes and the torch module vs timm
    test_against_torchvision.py   dense targets vs torchvision v2 MixUp/CutMix
    test_volumes.py        volumes and clips across time (3-D boxes, 3-D FMix)
    test_dali_targets.py   DALI: dense/multi-label/regression targets, video
    test_fmix.py           FMix masks vs the published maths; isotropy
    test_torch_module.py   gpumix.torch.Mixup behaviour and errors
    test_errors.py         bad input -> clear exceptions
    cudasim/               CUDA kernels vs references under the simulator

NUMBA_ENABLE_CUDASIM is fixed per process, so the simulator tests run in
their own pytest process (``NUMBA_ENABLE_CUDASIM=1 pytest tests/cudasim``);
in that process only they are collected, and in every other process they are
not. Tests marked ``cuda`` need a real GPU and are skipped without one.
"""

import os

import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

if SIMULATOR:
    collect_ignore_glob = ["test_*.py"]
else:
    collect_ignore = ["cudasim"]


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and driver (none here); "
                                   "run `pytest -m cuda` on a CUDA machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def batches_in_slices(monkeypatch):
    """The tests' batches are small, which the CPU kernels would mix on the
    calling thread alone (gpumix.kernels._launch.MIN_PARALLEL_BYTES): test
    them in slices across the pool, as large batches run. test_launch.py
    tests the rule itself."""
    from gpumix.kernels import _launch

    monkeypatch.setattr(_launch, "MIN_PARALLEL_BYTES", 0)


@pytest.fixture
def no_device_sync():
    """A context factory: inside it, any call of torch's that would wait for
    the GPU raises (``torch.cuda.set_sync_debug_mode("error")``)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def guard():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return guard
