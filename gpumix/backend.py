"""Backend choice in one place: ``device="auto"`` resolves once, with a reason
that ``gpumix info`` and the loader can print."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu" or "gpu"
    reason: str


def cuda_status() -> tuple[bool, str]:
    """Whether CUDA is usable here, and why (not)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (no GPU or driver)"
    try:
        from numba import cuda

        if not cuda.is_available():
            return False, "numba.cuda.is_available() is False"
    except Exception as error:  # pragma: no cover - depends on the install
        return False, f"numba.cuda failed: {error}"
    return True, f"CUDA device {torch.cuda.get_device_name()}"


def resolve_device(device: str = "auto") -> DeviceChoice:
    """"auto" -> "gpu" when CUDA is usable, else "cpu"; "cpu"/"gpu" checked."""
    if device not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    usable, why = cuda_status()
    if device == "auto":
        return DeviceChoice("gpu" if usable else "cpu", why)
    if device in ("gpu", "cuda"):
        if not usable:
            raise RuntimeError(f"device='gpu' was asked for but CUDA is not usable: {why}")
        return DeviceChoice("gpu", "asked for")
    return DeviceChoice("cpu", "asked for")
