"""DALI graphs for training and validation, as plain functions (the DALI
examples' shape: graph building in functions, a thin ``@pipeline_def``
around them, one ``device`` argument picking CPU or GPU).

    dataset_files(root)        -> (files, labels, class names), sorted, checked
    train_graph(...)           read -> decode the random crop only -> resize,
                               mirrored at random -> mix and normalise
    val_graph(...)             read -> decode -> resize -> centre crop -> normalize
    build_pipeline(...)        either graph in a Pipeline

The training graph mixes the uint8 crops and normalises them: a quarter of
the bytes of mixing float32 CHW. On the CPU the two are one operator
(:func:`gpumix.dali.mix_normalize`, :func:`gpumix.dali.normalize` with
mixing off). On the GPU the graph ends at the uint8 crops, the soft targets
and the params table (:func:`gpumix.dali.mix_params`), and the loader mixes
and normalises at the hand-off in one launch (:func:`gpumix.torch.apply`).

The horizontal flip is a reversed ROI of the resize (``_resize_mirrored``),
where it costs nothing, rather than ``fn.flip``, a copy of the batch. The
random-resized crop is chosen before decoding
(``decoders.image_random_crop``, the area and aspect-ratio ranges of
torchvision's RandomResizedCrop), so the JPEG decoder skips what the crop
leaves out. docs/design.md has the reasons and benchmarks/README.md the
figures.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # per channel, on 0..255 values
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
READER_NAME = "reader"


def dataset_files(root) -> tuple[list[str], list[int], list[str]]:
    """Files and labels of an ImageNet-style folder ``root/class/image.jpg``.

    Classes are the sorted sub-folder names; label = index in that list.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(root / name)):
            for f in sorted(names):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, f))
                    labels.append(label)
    if not files:
        raise ValueError(f"data folder {str(root)!r} holds no images: expected "
                         f"root/<class>/<image>{'|'.join(IMAGE_EXTENSIONS)}")
    return files, labels, classes


def read_file_list(path) -> tuple[list[str], list[int]]:
    """A DALI-style file list: one ``relative/or/absolute/path label`` per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file_list {str(path)!r} does not exist")
    files, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.rpartition(" ")
        if not name or not label.strip().lstrip("-").isdigit():
            raise ValueError(f"file_list {str(path)!r} line {number}: expected 'path label', "
                             f"got {line!r}")
        full = name if os.path.isabs(name) else str(path.parent / name)
        files.append(full)
        labels.append(int(label))
    if not files:
        raise ValueError(f"file_list {str(path)!r} lists no images")
    return files, labels


def reading_order(n_files: int, *, shuffle: bool, reader_seed: int = 0) -> np.ndarray:
    """The order in which the reader reads the file list in the first epoch
    (later epochs are reshuffled by DALI)."""
    if shuffle:
        return np.random.default_rng(reader_seed).permutation(n_files)
    return np.arange(n_files)


def distinct_paths(files) -> list[str]:
    """``files`` with every repeat of a path spelled differently: one "./"
    more before the file name per earlier occurrence (the same file). The
    mixing step takes trailing repeats of a batch's last ``source_info`` for
    the reader's padding (gpumix.dali), so a file listed twice (oversampling)
    must not read as one."""
    seen: dict[str, int] = {}
    distinct = []
    for path in files:
        count = seen.get(path, 0)
        seen[path] = count + 1
        if count:
            head, name = os.path.split(path)
            path = os.path.join(head, *["."] * count, name)
        distinct.append(path)
    return distinct


def _reader(files, labels, *, shuffle: bool, shard_id: int, num_shards: int,
            reader_seed: int = 0):
    """The file reader. Shuffling is global and epoch-dependent
    (``shuffle_after_epoch`` with one seed on every rank, so the shards of an
    epoch are disjoint and together cover the data); the first epoch's order
    is a seeded permutation of the list made here."""
    from nvidia.dali import fn

    files = distinct_paths(files)
    if shuffle:
        order = reading_order(len(files), shuffle=True, reader_seed=reader_seed)
        files = [files[i] for i in order]
        labels = [labels[i] for i in order]
    seed = dict(shuffle_after_epoch_seed=reader_seed) if shuffle else {}
    return fn.readers.file(files=files, labels=labels, shuffle_after_epoch=shuffle,
                           shard_id=shard_id, num_shards=num_shards, pad_last_batch=True,
                           name=READER_NAME, **seed)


def _decode(encoded, device: str, random_crop: bool = False):
    from nvidia.dali import fn, types

    decoder = fn.decoders.image_random_crop if random_crop else fn.decoders.image
    return decoder(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def _resize_mirrored(images, size):
    """Resize to ``size``, mirrored left-right with probability 1/2: the
    mirror is a reversed ROI of the resize (x from 1 to 0), free there,
    where ``fn.flip`` is a copy of the batch (4.4 ms per batch of 64 at
    224 px here, one thread)."""
    from nvidia.dali import fn

    flip = fn.random.uniform(values=[0.0, 1.0])  # a float coin flip
    roi_start = fn.stack(flip * 0.0, flip)  # (y, x): x starts at 1 when mirrored
    roi_end = fn.stack(flip * 0.0 + 1.0, 1.0 - flip)
    return fn.resize(images, size=list(size), roi_start=roi_start, roi_end=roi_end,
                     roi_relative=True)


def _normalize(images, *, dtype, layout: str = "CHW", crop=None):
    from nvidia.dali import fn

    kwargs = {"crop": crop} if crop is not None else {}
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout=layout, mean=list(IMAGENET_MEAN),
                                    std=list(IMAGENET_STD), **kwargs)


def flat(outputs) -> tuple:
    """An operator's outputs with nested tuples (split targets) spread out,
    as a pipeline returns them."""
    return tuple(node for out in outputs
                 for node in (out if isinstance(out, tuple) else (out,)))


def train_graph(files, labels, *, num_classes: int, size, device: str, mixing,
                mix_options: dict, dtype, shuffle: bool = True, shard_id: int = 0,
                num_shards: int = 1, return_params: bool = False, layout: str = "CHW",
                reader_seed: int = 0, handoff: bool = False):
    """Outputs of one training batch.

    ``mixing``: "gpumix", "none", or a function ``(images, labels, *,
    num_classes, size, **mix_options) -> (images, targets)`` on HWC uint8
    images (the benchmarks' DALI-only baselines), normalised after it with
    ``crop_mirror_normalize``. By default: (images CHW or HWC float, targets
    float32 (K,)[, params]). With ``handoff`` ("gpumix" or "none"), mixing
    and normalisation leave the graph for :func:`gpumix.torch.apply`:
    (images HWC uint8, targets[, table]), the targets on the images' device.
    ``mix_options`` may ask for split targets (three outputs in place of the
    targets: labels, partners' labels, label weights) and the clean batch
    (in the graph: clean images and targets after the targets; at the
    hand-off the clean targets alone, the crops being the clean images).
    """
    from nvidia.dali import fn

    from gpumix import dali as gdali

    encoded, label = _reader(files, labels, shuffle=shuffle, shard_id=shard_id,
                             num_shards=num_shards, reader_seed=reader_seed)
    images = _resize_mirrored(_decode(encoded, device, random_crop=True), size)
    smoothing = mix_options.get("label_smoothing", 0.0)
    if mixing not in ("gpumix", "none") and not callable(mixing):
        raise ValueError(f"mixing must be 'gpumix', 'none' or a function, got {mixing!r}")
    info = fn.get_property(encoded, key="source_info")
    if handoff:
        if mixing == "gpumix":
            *targets, rows = flat(gdali.mix_params(label, num_classes=num_classes,
                                                   size=tuple(size), source_info=info,
                                                   **mix_options))
        else:
            targets, rows = [gdali.smoothed_one_hot(label, num_classes, smoothing)], None
        targets = [t.gpu() for t in targets] if device == "gpu" else targets
        return (images, *targets) + (() if rows is None else (rows,))
    normalize = dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), output_layout=layout,
                     dtype=dtype, device=device)
    params = ()
    if mixing == "gpumix":
        images, targets, *params = flat(gdali.mix_normalize(
            images, label, num_classes=num_classes, size=tuple(size), source_info=info,
            return_params=return_params, **normalize, **mix_options))
    elif mixing == "none":
        images = gdali.normalize(images, **normalize)
        targets = gdali.smoothed_one_hot(label, num_classes, smoothing)
    else:
        images, targets = mixing(images, label, num_classes=num_classes, size=tuple(size),
                                 **mix_options)
        images = _normalize(images, dtype=dtype, layout=layout)
        if device == "gpu":
            targets = targets.gpu()
    return (images, targets, *params)


def val_graph(files, labels, *, size, device: str, dtype, shard_id: int = 0,
              num_shards: int = 1, layout: str = "CHW"):
    """Outputs (images CHW, labels int) of one validation batch (no mixing)."""
    from nvidia.dali import fn, types

    encoded, label = _reader(files, labels, shuffle=False, shard_id=shard_id,
                             num_shards=num_shards)
    images = _decode(encoded, device)
    # Both sides at least the crop's / 0.875, the aspect ratio kept: the
    # shorter side of a square crop's resize, and a non-square crop always fits.
    images = fn.resize(images, size=[round(n / 0.875) for n in size], mode="not_smaller",
                       interp_type=types.INTERP_TRIANGULAR)
    images = _normalize(images, dtype=dtype, layout=layout, crop=list(size))
    label = fn.cast(label, dtype=types.INT64)
    if device == "gpu":
        label = label.gpu()
    return images, label


def build_pipeline(files, labels, *, train: bool, batch_size: int, num_threads: int,
                   seed: int, device: str, device_id=None, checkpoint=None, **graph_options):
    """A built DALI Pipeline around train_graph or val_graph.

    DALI's dynamic executor, explicitly: its outputs are reference counted,
    so DALIGenericIterator hands them to torch through DLPack without a copy.
    The older pipelined executor ran the graph alone up to 15% faster here,
    but its outputs are copied into fresh torch tensors, and that copy (page
    faults on 38 MB per batch included) cost the loader 20 ms of main-thread
    time per batch of 64 at 224 px: more than it gained.
    """
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, seed=seed,
                  device_id=device_id if device == "gpu" else None,
                  enable_checkpointing=True, prefetch_queue_depth=2, exec_dynamic=True)
    def pipeline():
        graph = train_graph if train else val_graph
        return graph(files, labels, device=device, **graph_options)

    pipe = pipeline(checkpoint=checkpoint) if checkpoint is not None else pipeline()
    pipe.build()
    return pipe
