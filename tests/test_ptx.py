"""Every CUDA kernel compiles to PTX for sm_80 and sm_90 (NVRTC/NVVM from
numba-cuda[cu13]; no GPU needed), for every dtype it supports, and, when the
system ptxas is installed, assembles to SASS; its register/spill report is
printed (run with -s to see it).

Also checks that no float32 arithmetic is contracted into FMA on the GPU
(products that are summed go through libdevice's fmul_rn / fadd_rn), which
is what keeps outputs equal between the CPU and CUDA backends."""

import functools
import re
import shutil
import subprocess

import numba
import numpy as np
import pytest
from numba import cuda
from numba.core import types

from gpumix.kernels import (blend, box_paste, mask_mix, mask_select, normals, resize_paste,
                            saliency, shape_mask, soft_targets, table)
from gpumix.kernels._launch import DirectLaunch, parameter_converters

assert not numba.config.ENABLE_CUDASIM

IMAGE_TYPES = {"uint8": types.uint8, "float16": types.float16, "float32": types.float32}
I64 = types.Array(types.int64, 1, "C")
F32 = types.Array(types.float32, 1, "C")


def rows(dtype):
    return types.Array(dtype, 3, "C")


def signatures():
    for name, t in IMAGE_TYPES.items():
        yield f"blend-{name}", blend.cuda_kernel.pyfunc, (
            rows(t), I64, F32, I64, types.boolean, rows(t))
        yield f"box_paste-{name}", box_paste.cuda_kernel.pyfunc, (
            rows(t), I64, types.Array(types.int64, 2, "C"), I64, types.int64, types.int64, rows(t))
        yield f"mask_mix-{name}", mask_mix.cuda_kernel.pyfunc, (
            rows(t), I64, types.Array(types.float32, 3, "C"), I64, types.int64, types.int64,
            types.boolean, types.boolean, rows(t))
        yield f"resize_paste-{name}", resize_paste.cuda_kernel.pyfunc, (
            rows(t), I64, types.Array(types.int64, 2, "C"), I64, types.int64, types.int64,
            types.boolean, types.boolean, rows(t))
        yield f"saliency_thumbnails-{name}", saliency.cuda_kernel.pyfunc, (
            rows(t), I64, types.int64, types.int64, types.int64, rows(types.float32))
    table_rows = types.Array(types.float64, 2, "C")
    yield "shape_mask", shape_mask.cuda_kernel.pyfunc, (table_rows, rows(types.float32))
    yield "saliency_place", saliency.place_kernel.pyfunc, (
        table_rows, I64, types.Array(types.int64, 2, "C"), types.int64, types.int64)
    yield "box_paste-int64-dense", box_paste.cuda_kernel.pyfunc, (
        rows(types.int64), I64, types.Array(types.int64, 2, "C"), I64, types.int64, types.int64,
        rows(types.int64))
    yield "soft_targets", soft_targets.cuda_kernel.pyfunc, (
        I64, I64, F32, types.float32, types.float32, types.Array(types.float32, 2, "C"))
    yield "mask_select", mask_select.cuda_kernel.pyfunc, (
        types.Array(types.uint32, 2, "C"), I64, types.Array(types.float32, 2, "C"))
    f64 = types.Array(types.float64, 1, "C")
    yield "normals", normals.cuda_kernel.pyfunc, (
        types.Array(types.uint64, 2, "C"), types.int64, f64, f64,
        types.Array(types.uint64, 1, "C"), f64, types.float64, F32, types.boolean,
        types.Array(types.float32, 2, "C"))


CASES = list(signatures())


@functools.cache
def compiled_ptx(pyfunc, signature, cc=(9, 0)) -> str:
    """The kernel's PTX, compiled once per signature and target for the module."""
    return cuda.compile_ptx(pyfunc, tuple(signature), cc=cc)[0]


def assemble(ptx: str, arch: str, tmp_path) -> str:
    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    result = subprocess.run(["ptxas", f"-arch={arch}", "-v", str(source), "-o",
                             str(tmp_path / "kernel.cubin")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("name,pyfunc,signature", CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_to_ptx(name, pyfunc, signature, cc, tmp_path):
    ptx = compiled_ptx(pyfunc, signature, cc)
    assert ".entry" in ptx
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    if shutil.which("ptxas"):
        report = assemble(ptx, f"sm_{cc[0]}{cc[1]}", tmp_path)
        registers = re.search(r"Used (\d+) registers", report)
        assert registers, report
        print(f"{name} sm_{cc[0]}{cc[1]}: {registers.group(0)}; "
              f"{'no spills' if ' 0 bytes spill stores' in report else report}")


@pytest.mark.parametrize("name", ["blend-uint8", "blend-float32", "mask_mix-uint8",
                                  "resize_paste-uint8", "saliency_thumbnails-float32"])
def test_blend_products_are_not_fused(name):
    _, pyfunc, signature = next(c for c in CASES if c[0] == name)
    ptx = compiled_ptx(pyfunc, signature)
    assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx
    assert "fma.rn.f32" not in ptx


def _ptx_parameters(ptx: str) -> list[tuple[str, int]]:
    """(kind, bytes) of each parameter of the PTX entry: kind 'f' for floats."""
    entry = ptx[ptx.index(".entry"):]
    entry = entry[:entry.index(")")]
    return [("f" if kind == "f" else "i", int(bits) // 8)
            for kind, bits in re.findall(r"\.param \.([usbf])(\d+) ", entry)]


def _example(t):
    if isinstance(t, types.Array):
        return np.zeros((2,) * t.ndim, np.dtype(str(t.dtype)))
    return np.dtype(t.name).type(1)


@pytest.mark.parametrize("name,pyfunc,signature", CASES, ids=[c[0] for c in CASES])
def test_direct_launch_parameters_match_numbas_ptx(name, pyfunc, signature):
    """The parameters a direct (CuPy) launch passes have the kinds and widths
    of the compiled kernel's PTX parameter list, in order."""
    ptx = compiled_ptx(pyfunc, signature)
    launch = DirectLaunch(None, parameter_converters(signature))
    params = launch.parameters([_example(t) for t in signature])
    assert [("f" if p.dtype.kind == "f" else "i", p.dtype.itemsize) for p in params] \
        == _ptx_parameters(ptx)


def _fast_path_records():
    """Launch records of the fast path's kernels, built from example DeviceArrays."""
    from gpumix.kernels import mix_normalize, table_mix
    from gpumix.runtime import DeviceArray

    def array(shape, dtype):
        return DeviceArray.on_host(np.zeros(shape, dtype))

    for out_dtype in (np.float32, np.float16):
        args = (array((2, 4, 5, 3), np.uint8), array((2, table.N_COLUMNS), np.float64),
                array((2, 4, 5), np.float32), array(3, np.float32), array(3, np.float32), True,
                array((2, 3, 4, 5), out_dtype))
        yield f"mix_normalize-{np.dtype(out_dtype).name}", mix_normalize.cuda_kernel, args
    for image_dtype in (np.uint8, np.float16, np.float32):
        args = (array((2, 12, 5), image_dtype), array((2, 12, 5), image_dtype),
                array((2, table.N_COLUMNS), np.float64), array((2, 4, 5), np.float32),
                array(2, np.int64),
                array((2, 7), np.float32), array(1, np.int32), 4, 1, True, False,
                np.float32(0.1), np.float32(0.9))
        yield f"table_mix-{np.dtype(image_dtype).name}", table_mix.cuda_kernel, args


RECORDS = list(_fast_path_records())


@pytest.mark.parametrize("name,kernel,args", RECORDS, ids=[r[0] for r in RECORDS])
def test_launch_records_match_the_compiled_parameter_list(name, kernel, args, tmp_path):
    """A prepacked launch record has the compiled kernel's parameters, in
    order, with their kinds and widths; its fixed slots hold the shapes and
    strides and a call patches the data pointers and scalars."""
    from gpumix.runtime import LaunchRecord

    record = LaunchRecord(args)
    ptx = compiled_ptx(kernel.pyfunc, record.argtypes)
    assert record.kinds == _ptx_parameters(ptx)
    record.patch(args)
    first = args[0]
    assert record.values[4] == first.ptr  # meminfo, parent, nitems, itemsize, data
    assert list(record.values[5:5 + first.ndim]) == list(first.shape)
    assert record.pointers[1] - record.pointers[0] == 8
    if shutil.which("ptxas"):
        assemble(ptx, "sm_90", tmp_path)


def test_no_kernel_fuses_float32_arithmetic():
    """NVVM contracts a multiply and an add into one FMA unless told not to,
    which rounds once where the CPU twin rounds twice. No kernel may hold a
    float32 FMA; float64 FMAs come only from libdevice's exp and log (SmoothMix
    profiles, FMix normals), whose last bit is not shared with a CPU's libm."""
    fused = {}
    for name, pyfunc, signature in CASES:
        ptx = compiled_ptx(pyfunc, signature)
        fused[name] = ptx.count("fma.rn.f32")
    from gpumix.runtime import LaunchRecord

    for name, kernel, args in RECORDS:
        fused[name] = compiled_ptx(kernel.pyfunc, LaunchRecord(args).argtypes).count(
            "fma.rn.f32")
    assert len(fused) == len(CASES) + len(RECORDS) and not any(fused.values()), fused
