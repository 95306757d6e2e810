"""The GPU fast path's host side, run here without a GPU: every launch and
upload goes to a RecordingLauncher, which records instead of running and
refuses anything that would synchronise. The kernels themselves are checked
under the simulator (tests/cudasim/test_fast_path_sim.py) and their launch
records against the PTX (tests/test_ptx.py)."""

import numpy as np
import pytest
import torch

import gpumix
from gpumix import runtime
from gpumix.kernels import table
from gpumix.params import sample, to_table
from gpumix.torch import (IMAGENET_MEAN, IMAGENET_STD, Mixup, _normalization, handoff_cuda,
                          mix_cuda)


@pytest.fixture
def no_sync(monkeypatch):
    """A recording launcher, with torch's synchronising calls made to fail."""
    def refuse(*args, **kwargs):
        raise AssertionError("the host path synchronised")

    monkeypatch.setattr(torch.cuda, "synchronize", refuse)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", refuse)
    launcher = runtime.RecordingLauncher()
    with runtime.use_launcher(launcher):
        yield launcher


MORE = dict(method_weights={"resizemix": 1, "smoothmix": 1, "gridmix": 1, "saliencymix": 1},
            saliencymix_alpha=1.0)


def host(shape, dtype):
    return runtime.DeviceArray.on_host(np.zeros(shape, dtype))


def table_for(b, h, w, **options):
    config = gpumix.MixConfig(num_classes=10, mode="elem", **options)
    params = sample(config, b, (h, w), np.random.default_rng(0))
    return params, to_table(params, (h, w), config), config


@pytest.mark.parametrize("chw", [True, False])
def test_handoff_is_one_launch_and_one_upload(no_sync, chw):
    b, h, w = 64, 32, 24
    _, rows, _ = table_for(b, h, w, mixup_alpha=0.8, cutmix_alpha=1.0)
    images = host((b, h, w, 3), np.uint8)
    out = host((b, 3, h, w) if chw else (b, h, w, 3), np.float32)
    mean, inv_std = _normalization(IMAGENET_MEAN, IMAGENET_STD, 3)
    handoff_cuda(images, rows, mean, inv_std, chw, out, 1234, None, no_sync)  # warm caches
    launches, uploads = no_sync.launch_count, no_sync.upload_count
    handoff_cuda(images, rows, mean, inv_std, chw, out, 1234, None, no_sync)
    assert no_sync.launch_count == launches + 1 and no_sync.upload_count == uploads + 1
    name, grid, block, stream, values = no_sync.launches[-1]
    assert name == "_mix_normalize_cuda" and stream == 1234
    np.testing.assert_array_equal(no_sync.uploads[-1], rows)  # the table, as given
    assert images.ptr in values and out.ptr in values  # the record points at both buffers
    assert grid[1] == b * h  # every image row is covered


def test_handoff_with_fmix_makes_masks_first(no_sync):
    b, h, w = 8, 16, 16
    _, rows, _ = table_for(b, h, w, mixup_alpha=0.0, fmix_alpha=1.0)
    mean, inv_std = _normalization(IMAGENET_MEAN, IMAGENET_STD, 3)
    handoff_cuda(host((b, h, w, 3), np.uint8), rows, mean, inv_std, True,
                 host((b, 3, h, w), np.float32), 7, None, no_sync)
    assert [entry[0] for entry in no_sync.launches[-2:]] == ["fmix_masks", "_mix_normalize_cuda"]


@pytest.mark.parametrize("pairing,by_pairs", [("flip", True), ("roll", False)])
def test_mixup_call_is_one_launch_with_the_targets(no_sync, pairing, by_pairs):
    b, c, h, w = 64, 3, 32, 32
    params, rows, config = table_for(b, h, w, mixup_alpha=0.8, cutmix_alpha=1.0,
                                     pairing=pairing)
    x = host((b, c, h, w), np.float32)
    labels, targets = host(b, np.int64), host((b, 10), np.float32)
    flag = no_sync.flag()
    mix_cuda(x, x, rows, params, "NCHW", labels, targets, runtime.DeviceArray.on_host(flag),
             config, by_pairs, 99, None, no_sync)
    name, grid, _, stream, values = no_sync.launches[-1]
    assert name == "_table_mix_cuda" and stream == 99 and no_sync.launch_count == 1
    assert grid[1] == b * c * h + b  # image rows, then one row of targets per sample
    assert labels.ptr in values and targets.ptr in values and flag.ctypes.data in values
    assert no_sync.upload_count == 1


def test_new_methods_place_boxes_and_make_masks_before_the_one_mix_launch(no_sync):
    """SaliencyMix boxes are placed on the device (peaks, then the place
    kernel) and SmoothMix/GridMix masks made by one kernel, all on the
    call's stream, before the one launch that mixes; two uploads (the
    table, and the rows to place with their partners), no wait."""
    b, c, h, w = 16, 3, 24, 20
    params, rows, config = table_for(b, h, w, **MORE)
    assert {4, 5, 6, 7} <= set(params.method.tolist())
    x, out = host((b, c, h, w), np.uint8), host((b, c, h, w), np.uint8)
    labels, targets = host(b, np.int64), host((b, 10), np.float32)
    mix_cuda(x, out, rows, params, "NCHW", labels, targets,
             runtime.DeviceArray.on_host(no_sync.flag()), config, False, 5, None, no_sync)
    # the masks are allocated (and zeroed) on the stream whose kernels fill and read them
    assert ((b, h, w), 5) in no_sync.allocations
    assert [entry[0] for entry in no_sync.launches] == [
        "saliency_peaks", "_place_cuda", "_masks_cuda", "_table_mix_cuda"]
    assert {entry[3] for entry in no_sync.launches} == {5}
    np.testing.assert_array_equal(no_sync.uploads[0], rows)
    todo = np.flatnonzero(params.method == 7)
    np.testing.assert_array_equal(no_sync.uploads[1], [todo, params.pair[todo]])
    assert no_sync.upload_count == 2


def test_recording_launcher_refuses_to_synchronise():
    with pytest.raises(runtime.SynchronizingCall):
        runtime.RecordingLauncher().synchronize()


def test_apply_checks_its_inputs():
    from gpumix.torch import apply

    _, rows, _ = table_for(2, 8, 6, mixup_alpha=1.0)
    images = torch.zeros((2, 8, 6, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        apply(images.float(), rows)
    with pytest.raises(ValueError, match=rf"float64 of shape \(B, {table.N_COLUMNS}\)"):
        apply(images, rows[:, :5])
    with pytest.raises(ValueError, match="made for size"):
        apply(torch.zeros((2, 6, 8, 3), dtype=torch.uint8), rows)
    with pytest.raises(ValueError, match="2 rows for a batch of 3"):
        apply(torch.zeros((3, 8, 6, 3), dtype=torch.uint8), rows)
    with pytest.raises(ValueError, match="one value or one per channel"):
        apply(images, rows, mean=[1, 2], std=[1, 2])
    # the table's values index memory: each is checked, never trusted
    for column, value, match in [(table.PAIR, 2, r"table column pair must index the batch"),
                                 (table.METHOD, 42, "method codes 0 to 7"),
                                 (table.X1, 7, "table column box must hold half-open boxes"),
                                 (table.HEIGHT, 9, r"table row 1 was made for size=\(9, 6\)")]:
        bad = rows.copy()
        bad[1, column] = value
        if column == table.X1:
            bad[1, table.METHOD] = 2  # CutMix
        with pytest.raises(ValueError, match=match):
            apply(images, bad)


def test_apply_takes_torch_shaped_constants_and_empty_batches():
    from gpumix.torch import IMAGENET_MEAN, IMAGENET_STD, apply, identity_table

    _, rows, _ = table_for(2, 8, 6, mixup_alpha=1.0)
    images = torch.randint(0, 256, (2, 8, 6, 3), dtype=torch.uint8)
    as_columns = apply(images, rows, mean=torch.tensor(IMAGENET_MEAN).view(3, 1, 1),
                       std=torch.tensor(IMAGENET_STD).view(3, 1, 1))
    torch.testing.assert_close(as_columns, apply(images, rows), rtol=0, atol=0)
    empty = apply(images[:0], identity_table(0, (8, 6)))
    assert tuple(empty.shape) == (0, 3, 8, 6) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="identity_table needs"):
        identity_table(3, (8, 8, 8))


@pytest.mark.cuda
@pytest.mark.parametrize("methods", ["timm-fmix", "more"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_apply_on_cuda_equals_the_cpu_twin_without_a_sync(channels_last, methods,
                                                          no_device_sync):
    from gpumix.torch import apply

    options = dict(mixup_alpha=0.8, cutmix_alpha=1.0, fmix_alpha=1.0) if methods != "more" \
        else MORE
    params, rows, _ = table_for(16, 40, 36, **options)
    images = torch.randint(0, 256, (16, 40, 36, 3), dtype=torch.uint8)
    expected = apply(images, rows, channels_last=channels_last)
    on_gpu = images.cuda()
    with no_device_sync():
        got = apply(on_gpu, rows, channels_last=channels_last)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("methods", ["timm", "more"])
@pytest.mark.parametrize("pairing", ["flip", "roll"])
def test_cuda_mixup_makes_no_sync_and_equals_the_cpu_module(pairing, methods, no_device_sync):
    options = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=10,
                   pairing=pairing, **(MORE if methods == "more" else {}))
    x = torch.rand(32, 3, 24, 20)
    y = torch.randint(0, 10, (32,))
    x_cpu, t_cpu = Mixup(seed=3, **options)(x.clone(), y)
    x_gpu, y_gpu = x.cuda(), y.cuda()
    mixup = Mixup(seed=3, **options)
    with no_device_sync():
        x_gpu, t_gpu = mixup(x_gpu, y_gpu)
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=0, atol=1e-6)
    torch.testing.assert_close(t_gpu.cpu(), t_cpu, rtol=0, atol=1e-7)
    bad = torch.full((32,), 11, device="cuda")
    mixup(x_gpu, bad)
    with pytest.raises(ValueError, match="outside"):
        mixup.check()


def test_cuda_launcher_hands_the_record_to_the_driver():
    """CudaLauncher passes grid, block, stream and the record's address in the
    shapes cuda.bindings' cuLaunchKernel takes: the call gets past argument
    parsing to the driver, which refuses it (no driver here; a null function
    on a GPU machine), never with a TypeError."""
    from types import SimpleNamespace

    _, rows, _ = table_for(2, 4, 4, mixup_alpha=1.0)
    record = runtime.LaunchRecord((host((2, 4, 4, 3), np.uint8), rows.shape[0], True))
    # the driver's refusal: no driver library here (cuda.pathfinder's
    # DynamicLibNotFoundError), cuLaunchKernel's error code on a GPU machine
    with pytest.raises(RuntimeError, match="cuLaunchKernel failed|NVIDIA driver"):
        runtime.CudaLauncher().launch(SimpleNamespace(ptr=0), (1, 2), 128, 0, record)


@pytest.mark.cuda
def test_a_second_device_mixes_on_its_own_stream_and_staging_ring():
    """A tensor on cuda:1 while cuda:0 is current: the call runs on cuda:1
    (its stream, kernels, pool) and equals the CPU module; the pinned
    staging ring keeps one set of slots per device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import cupy as cp

    from gpumix.kernels._launch import STAGING_SLOTS, upload_many

    options = dict(mixup_alpha=1.0, cutmix_alpha=1.0, method_weights={"mixup": 1, "cutmix": 1,
                   "smoothmix": 1, "gridmix": 1}, num_classes=10, mode="elem")
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    expected = Mixup(seed=4, **options)(x.clone(), y)
    with torch.cuda.device(0):
        got = Mixup(seed=4, **options)(x.to("cuda:1"), y.to("cuda:1"))
    for a, b in zip(got, expected):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6)
    for device in (0, 1, 0):
        with cp.cuda.Device(device):
            for k in range(STAGING_SLOTS + 1):
                (copy,) = upload_many([(np.arange(k + 5), np.int64)])
                np.testing.assert_array_equal(copy.get(), np.arange(k + 5))
