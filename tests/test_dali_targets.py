"""Beyond class ids and images in real DALI pipelines: dense, multi-label
and regression vectors mixed like gpumix.mix_targets on the params the
operator returns, split targets, label_lam, clean plus mixed, C-Mixup's
pairing on regression values, and FHWC video clips (one box or mask for
every frame, against the 2-D reference frame by frame)."""

import dataclasses

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def

import gpumix.dali as gdali
from gpumix import mixing
from gpumix.pipelines import flat
from gpumix.params import MixParams, from_table

B, K = 6, 4
RNG = np.random.default_rng(3)
IMAGES = RNG.integers(0, 256, (B, 10, 12, 3), np.uint8)
ALL3 = dict(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode="elem")
VECTORS = {
    "dense": RNG.dirichlet(np.ones(K), B).astype(np.float32),
    "multi_label": (RNG.random((B, K)) < 0.4).astype(np.float32),
    "regression": RNG.standard_normal((B, 2)).astype(np.float32),
    "classes": np.array([[0], [1], [2], [3], [1], [0]], np.int32),
}


def run(operator, labels, seed=11, data=IMAGES, layout="HWC", size=(10, 12), **options):
    """One run of ``operator(data, labels, ...)`` in a CPU pipeline; every
    output as a NumPy batch (tuples of outputs flattened). The mixed batch
    must come out in ``layout``."""

    @pipeline_def(batch_size=B, num_threads=1, device_id=None, seed=seed)
    def pipe():
        images = fn.external_source(source=lambda: list(data), batch=True, layout=layout)
        label = fn.external_source(source=lambda: list(labels), batch=True)
        extra = {} if operator is gdali.mix_normalize else {"layout": layout}
        return flat(operator(images, label, num_classes=K, size=size, **extra, **options))

    p = pipe()
    p.build()
    outputs = p.run()
    gdali.raise_pending(p)
    if operator is gdali.mix:
        assert outputs[0].layout() == layout
    return [np.stack([np.array(s) for s in out]) for out in outputs]


def params_of(outputs, start, mask=False):
    """MixParams from the return_params outputs (labels, pair, lam, method,
    box[, mask])."""
    _, pair, lam, method, box = outputs[start:start + 5]
    return MixParams(pair=pair.reshape(-1), lam=lam.reshape(-1), method=method.reshape(-1),
                     box=box, mask=outputs[start + 5] if mask else None)


@pytest.mark.parametrize("kind", ["dense", "multi_label", "regression"])
def test_target_vectors_are_mixed_like_mix_targets(kind):
    labels = VECTORS[kind]
    outputs = run(gdali.mix, labels, targets=kind, return_params=True, mixup_alpha=1.0,
                  cutmix_alpha=1.0, mode="elem", label_smoothing=0.1)
    images, targets = outputs[:2]
    params = params_of(outputs, 2)
    smoothing, toward = mixing.target_smoothing(kind, 0.1, K)
    expected = mixing.mix_targets(labels, params, smoothing=smoothing, toward=toward)
    np.testing.assert_array_equal(targets, expected)
    np.testing.assert_array_equal(images, mixing.reference_mix_images(IMAGES, params, "NHWC"))
    # the formula written out: smoothed towards 1/K (dense), 0.5 (multi-label,
    # timm's), never (regression), then blended by the pixels' lam
    toward_value = {"dense": 1 / K, "multi_label": 0.5, "regression": None}[kind]
    smoothed = labels if toward_value is None else labels * 0.9 + 0.1 * toward_value
    lam = params.lam[:, None]
    np.testing.assert_allclose(targets, lam * smoothed + (1 - lam) * smoothed[params.pair],
                               atol=1e-6)
    if kind == "dense":
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["classes", "dense"])
def test_split_targets_give_the_partners_and_the_label_weights(kind):
    labels = VECTORS[kind]
    outputs = run(gdali.mix, labels, targets=kind, split_targets=True, return_params=True,
                  label_lam=lambda lam: lam ** 2, mixup_alpha=1.0, mode="elem")
    _, y_a, y_b, weight = outputs[:4]
    params = params_of(outputs, 4)
    np.testing.assert_array_equal(y_a, labels)
    np.testing.assert_array_equal(y_b, labels[params.pair])
    assert y_b.dtype == (np.int64 if kind == "classes" else np.float32)
    np.testing.assert_allclose(weight.reshape(-1), params.lam ** 2, rtol=1e-6)


def test_fixed_label_lam_weights_the_soft_targets():
    outputs = run(gdali.mix, VECTORS["classes"], label_lam=0.5, return_params=True,
                  mixup_alpha=1.0, mode="elem", label_smoothing=0.0)
    targets = outputs[1]
    params = params_of(outputs, 2)
    half = MixParams(pair=params.pair, lam=np.full(B, 0.5, np.float32), method=params.method,
                     box=params.box)
    np.testing.assert_array_equal(targets, mixing.reference_soft_targets(
        VECTORS["classes"].reshape(-1), half, K, 0.0))
    assert not np.allclose(params.lam, 0.5)  # the pixels keep their own lam


@pytest.mark.parametrize("kind", ["classes", "dense", "regression"])
@pytest.mark.parametrize("operator", [gdali.mix, gdali.mix_normalize])
def test_clean_batch_and_its_targets_come_with_the_mixed_one(kind, operator):
    labels = VECTORS[kind]
    norm = dict(mean=[100.0, 110.0, 120.0], std=[50.0, 55.0, 60.0]) \
        if operator is gdali.mix_normalize else {}
    mixed, targets, clean, clean_targets = run(operator, labels, targets=kind,
                                               return_clean=True, mixup_alpha=1.0,
                                               label_smoothing=0.2, **norm)
    if norm:
        expected = (IMAGES - np.array(norm["mean"])) / np.array(norm["std"])
        np.testing.assert_allclose(clean, expected.transpose(0, 3, 1, 2), atol=1e-5)
    else:
        np.testing.assert_array_equal(clean, IMAGES)
        assert not np.array_equal(mixed, IMAGES)
    if kind == "classes":
        onehot = np.eye(K)[labels.reshape(-1)]
        np.testing.assert_allclose(clean_targets, onehot * 0.8 + 0.2 / K, atol=1e-7)
    elif kind == "dense":
        np.testing.assert_allclose(clean_targets, labels * 0.8 + 0.2 / K, atol=1e-7)
    else:
        np.testing.assert_array_equal(clean_targets, labels)


def test_c_mixup_pairs_regression_values_by_their_distance():
    """Two groups of values far apart: with a small bandwidth every partner
    comes from the sample's own group (C-Mixup's kernel), in DALI too."""
    values = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]], np.float32)
    for seed in range(4):
        outputs = run(gdali.mix, values, seed=seed, targets="regression", return_params=True,
                      mixup_alpha=1.0, pairing="c-mixup", cmixup_bandwidth=0.5, mode="elem")
        pair = params_of(outputs, 2).pair
        group = np.arange(B) // 3
        np.testing.assert_array_equal(group[pair], group)
        assert np.all(pair != np.arange(B))


def test_mix_params_makes_vector_targets_and_clean_ones_for_the_hand_off():
    labels = VECTORS["multi_label"]

    @pipeline_def(batch_size=B, num_threads=1, device_id=None, seed=2)
    def pipe():
        label = fn.external_source(source=lambda: list(labels), batch=True)
        return gdali.mix_params(label, num_classes=K, size=(10, 12), targets="multi_label",
                                mixup_alpha=1.0, mode="elem", label_smoothing=0.1,
                                return_clean=True)

    p = pipe()
    p.build()
    targets, clean_targets, rows = (np.stack([np.array(s) for s in out]) for out in p.run())
    params = from_table(rows)
    np.testing.assert_array_equal(targets, mixing.mix_targets(labels, params, smoothing=0.1,
                                                              toward=0.5))
    smoothed, lam = labels * 0.9 + 0.05, params.lam[:, None]  # timm's multi-label smoothing
    np.testing.assert_allclose(targets, lam * smoothed + (1 - lam) * smoothed[params.pair],
                               atol=1e-6)
    np.testing.assert_allclose(clean_targets, smoothed, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind,labels,match", [
    ("dense", np.ones((B, K + 1), np.float32), "labels must be 4 values per sample"),
    ("classes", np.ones((B, 2), np.int32), "one class id per sample"),
])
def test_labels_of_the_wrong_width_are_reported(kind, labels, match):
    @pipeline_def(batch_size=B, num_threads=1, device_id=None, seed=2)
    def pipe():
        images = fn.external_source(source=lambda: list(IMAGES), batch=True, layout="HWC")
        label = fn.external_source(source=lambda: list(labels), batch=True)
        return gdali.mix(images, label, num_classes=K, targets=kind, mixup_alpha=1.0)

    p = pipe()
    p.build()
    p.run()
    with pytest.raises(ValueError, match=match):
        gdali.raise_pending(p)


def test_bad_target_options_fail_when_the_graph_is_built():
    with pytest.raises(ValueError, match="targets must be one of"):
        gdali.TargetOptions("soft")
    with pytest.raises(ValueError, match="label_lam"):
        gdali.TargetOptions("classes", label_lam=1.5)


# ------------------------------------------------------------------- video
CLIPS = RNG.integers(0, 256, (B, 3, 10, 12, 3), np.uint8)  # B clips of 3 frames, FHWC


@pytest.mark.parametrize("options", [
    dict(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode="elem"),
    dict(method_weights={"smoothmix": 1, "gridmix": 1}, mode="elem"),
])
def test_video_clips_take_one_box_or_mask_for_every_frame(options):
    outputs = run(gdali.mix, VECTORS["classes"], seed=4, data=CLIPS, layout="FHWC",
                  return_params=True, return_clean=True, **options)
    clips, targets, clean = outputs[:3]
    params = params_of(outputs, 4, mask=True)
    assert clips.shape == CLIPS.shape and params.mask.shape == (B, 10, 12)
    np.testing.assert_array_equal(clean, CLIPS)
    for f in range(3):  # each frame mixed as a 2-D image with the clip's params
        np.testing.assert_array_equal(clips[:, f], mixing.reference_mix_images(
            np.ascontiguousarray(CLIPS[:, f]), params, "NHWC"))
    np.testing.assert_array_equal(targets, mixing.reference_soft_targets(
        VECTORS["classes"].reshape(-1), params, K, 0.1))


def test_video_clips_refuse_whole_image_methods_and_need_a_size():
    def build(**options):
        @pipeline_def(batch_size=B, num_threads=1, device_id=None)
        def pipe():
            clips = fn.external_source(source=lambda: list(CLIPS), batch=True, layout="FHWC")
            label = fn.external_source(source=lambda: list(VECTORS["classes"]), batch=True)
            return gdali.mix(clips, label, num_classes=K, layout="FHWC", **options)

        pipe()

    with pytest.raises(ValueError, match="resizemix read whole images"):
        build(size=(10, 12), method_weights={"resizemix": 1})
    with pytest.raises(ValueError, match="size=\\(H, W\\) of a frame is required"):
        build(mixup_alpha=1.0)


# ----------------------------------------------------------------- volumes
VOLUMES = RNG.integers(0, 256, (B, 4, 6, 5, 2), np.uint8)  # DHWC


@pytest.mark.parametrize("layout", ["DHWC", "CDHW", "FHWC"])
def test_volumes_take_cuboids_and_3d_masks_like_the_reference(layout):
    """Volumes, and clips mixed across time (FHWC with size=(T, H, W))."""
    data = VOLUMES if layout != "CDHW" else np.ascontiguousarray(
        VOLUMES.transpose(0, 4, 1, 2, 3).astype(np.float32))
    outputs = run(gdali.mix, VECTORS["classes"], seed=6, data=data, layout=layout,
                  size=(4, 6, 5), return_params=True, **ALL3)
    mixed, targets = outputs[:2]
    params = params_of(outputs, 2, mask=True)
    assert params.box.shape == (B, 6) and params.mask.shape == (B, 4 * 6, 5)
    params = dataclasses.replace(params, mask=params.mask.reshape(B, 4, 6, 5))
    assert {1, 2, 3} <= set(params.method.tolist())
    reference = mixing.reference_mix_images(data, params, "NCDHW" if layout == "CDHW"
                                            else "NDHWC")
    np.testing.assert_array_equal(mixed, reference)
    np.testing.assert_array_equal(targets, mixing.reference_soft_targets(
        VECTORS["classes"].reshape(-1), params, K, 0.1))


# --------------------------------------------------- spectrograms, signals
@pytest.mark.parametrize("layout,shape", [("FT", (8, 20)), ("T", (30,))])
def test_spectrograms_and_signals_are_one_channel_images(layout, shape):
    data = RNG.standard_normal((B, *shape)).astype(np.float32)
    outputs = run(gdali.mix, VECTORS["classes"], seed=3, data=data, layout=layout, size=shape,
                  return_params=True, cutmix_axes="width", **ALL3)
    params = params_of(outputs, 2, mask=True)
    images = data.reshape(B, -1, shape[-1], 1)  # (B, H, W, 1): H = F, or 1 for a signal
    assert {1, 2, 3} <= set(params.method.tolist())
    cut = params.method == 2
    np.testing.assert_array_equal(params.box[cut, :2], [[0, images.shape[1]]] * cut.sum())
    np.testing.assert_array_equal(outputs[0].reshape(images.shape),
                                  mixing.reference_mix_images(images, params, "NHWC"))


@pytest.mark.cuda
def test_gpu_stage_volumes_equal_the_cpu_stage():
    """Volumes on the GPU stage: the masks come from the CPU stage's params
    step, the table-driven kernel applies them (cuboids marked masked)."""

    def outputs(device):
        @pipeline_def(batch_size=B, num_threads=1, device_id=0, seed=6)
        def pipe():
            volumes = fn.external_source(source=lambda: list(VOLUMES), batch=True,
                                         layout="DHWC")
            label = fn.external_source(source=lambda: list(VECTORS["classes"]), batch=True)
            source = volumes.gpu() if device == "gpu" else volumes
            return gdali.mix(source, label, num_classes=K, layout="DHWC", size=(4, 6, 5),
                             return_params=True, device=device, **ALL3)

        p = pipe()
        p.build()
        result = p.run()
        gdali.raise_pending(p)
        return [np.stack([np.array(s.as_cpu() if hasattr(s, "as_cpu") else s) for s in out])
                for out in result]

    gpu, cpu = outputs("gpu"), outputs("cpu")
    for got, expected in zip(gpu, cpu):
        np.testing.assert_array_equal(got, expected)
