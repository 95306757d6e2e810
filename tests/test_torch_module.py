"""gpumix.torch.Mixup on torch tensors: in place / out of place, layouts,
dtypes, odd batches, determinism, training use; CUDA tests marked."""

import numpy as np
import pytest
import torch

import gpumix.torch
from gpumix import mixing

OPTIONS = dict(mixup_alpha=0.8, cutmix_alpha=1.0, fmix_alpha=1.0, mode="elem", num_classes=7)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_matches_reference_for_dtypes_and_odd_batches(dtype, batch):
    mixup = gpumix.torch.Mixup(**OPTIONS, seed=batch, inplace=False)
    x = (torch.rand(batch, 3, 12, 10) * 255).to(dtype)
    y = torch.randint(0, 7, (batch,))
    mixed, targets = mixup(x, y)
    params = mixup.last_params
    expected = mixing.reference_mix_images(x.numpy(), params, "NCHW")
    np.testing.assert_array_max_ulp(mixed.float().numpy(), expected.astype(np.float32), 1)
    assert targets.dtype == torch.float32 and targets.shape == (batch, 7)
    torch.testing.assert_close(targets.sum(1), torch.ones(batch), rtol=0, atol=1e-6)


def test_in_place_by_default_and_out_of_place_leaves_input():
    x = torch.rand(4, 3, 8, 8)
    y = torch.randint(0, 7, (4,))
    original = x.clone()
    out, _ = gpumix.torch.Mixup(**OPTIONS, seed=0, inplace=False)(x, y)
    assert out is not x
    torch.testing.assert_close(x, original, rtol=0, atol=0)
    out2, _ = gpumix.torch.Mixup(**OPTIONS, seed=0)(x, y)
    assert out2 is x
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_channels_last_matches_nchw():
    x = torch.rand(6, 3, 9, 13)
    y = torch.randint(0, 7, (6,))
    a, ta = gpumix.torch.Mixup(**OPTIONS, seed=3, inplace=False)(x, y)
    b, tb = gpumix.torch.Mixup(**OPTIONS, seed=3, inplace=False)(
        x.to(memory_format=torch.channels_last), y)
    assert b.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ta, tb, rtol=0, atol=0)


def test_same_seed_same_sequence_and_torch_generator_seeding():
    x = torch.rand(4, 3, 8, 8)
    y = torch.randint(0, 7, (4,))
    runs = []
    for _ in range(2):
        m = gpumix.torch.Mixup(**OPTIONS, generator=torch.Generator().manual_seed(11),
                               inplace=False)
        runs.append([m(x, y)[0] for _ in range(3)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(runs[0][0], runs[0][1])


def test_mixup_enabled_false_gives_identity_and_smoothed_one_hot():
    m = gpumix.torch.Mixup(**OPTIONS, seed=0, inplace=False, label_smoothing=0.0)
    m.mixup_enabled = False
    x = torch.rand(3, 3, 8, 8)
    y = torch.tensor([0, 6, 2])
    out, t = m(x, y)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    torch.testing.assert_close(t, torch.nn.functional.one_hot(y, 7).float())


def test_targets_train_a_model_with_soft_cross_entropy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mixup = gpumix.torch.Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=4, seed=0)
    x_all = torch.randn(64, 3, 8, 8)
    y_all = torch.arange(64) % 4
    x_all += y_all[:, None, None, None].float()  # learnable signal

    def clean_loss():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x_all), y_all).item()

    before = clean_loss()
    for _ in range(60):
        x, t = mixup(x_all.clone(), y_all)
        loss = torch.nn.functional.cross_entropy(model(x), t)  # soft-label cross-entropy
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert clean_loss() < 0.7 * before


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
def test_cuda_tensors_match_cpu(dtype):
    from gpumix.kernels import blend, box_paste, soft_targets

    options = dict(OPTIONS, fmix_alpha=0.0)  # FMix masks come from different FFTs
    cpu_mix = gpumix.torch.Mixup(**options, seed=5, inplace=False)
    gpu_mix = gpumix.torch.Mixup(**options, seed=5, inplace=False)
    # Three calls: the first launch of each kernel signature goes through
    # Numba's dispatcher, the later ones through the direct (CuPy) launch.
    for _ in range(3):
        x = (torch.rand(6, 3, 20, 18) * 255).to(dtype)
        y = torch.randint(0, 7, (6,))
        cpu_out, cpu_t = cpu_mix(x, y)
        gpu_out, gpu_t = gpu_mix(x.cuda(), y.cuda())
        assert gpu_out.is_cuda and gpu_t.is_cuda
        torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=0,
                                   atol=0 if dtype == torch.uint8 else 1e-6)
        torch.testing.assert_close(gpu_t.cpu(), cpu_t, rtol=0, atol=1e-7)
    for kernel in (blend.cuda_kernel, box_paste.cuda_kernel, soft_targets.cuda_kernel):
        assert kernel.direct_failure is None
        assert any(direct is not None for direct in kernel._direct.values())


@pytest.mark.cuda
def test_cuda_fmix_masks_have_exactly_k_ones():
    m = gpumix.torch.Mixup(mixup_alpha=0.0, fmix_alpha=1.0, mode="elem", num_classes=3, seed=0)
    x = torch.rand(8, 3, 32, 32, device="cuda")
    for _ in range(3):  # the later calls launch the kernels directly
        m(x, torch.zeros(8, dtype=torch.int64, device="cuda"))
        masks = m.last_params.mask.get()
        np.testing.assert_array_equal(masks.reshape(8, -1).sum(1),
                                      np.round(m.last_params.lam * 1024))


def test_threads_sharing_one_module_never_see_each_others_pixels():
    """In place on the CPU, each call mixes from a snapshot: one per calling
    thread, so two threads sharing a module keep their batches apart."""
    import threading

    mixup = gpumix.torch.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem",
                               pairing="permutation", num_classes=4, seed=0)
    generator = torch.Generator().manual_seed(0)
    low = [torch.randint(0, 128, (16, 3, 64, 64), dtype=torch.uint8, generator=generator)
           for _ in range(30)]
    high = [torch.randint(128, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=generator)
            for _ in range(30)]
    crossed = []

    def run(batches, own_half):
        for x in batches:
            out, _ = mixup(x, torch.zeros(16, dtype=torch.long))
            crossed.append(bool(((out >= 128) != own_half).any()))

    threads = [threading.Thread(target=run, args=(low, False)),
               threading.Thread(target=run, args=(high, True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(crossed) == 60 and not any(crossed)
