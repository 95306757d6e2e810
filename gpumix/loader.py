"""DALIMixLoader: a drop-in replacement for a torch DataLoader that yields
mixed images and soft targets, built on a DALI pipeline.

    loader = DALIMixLoader("imagenet/train", batch_size=64, mixup_alpha=0.8,
                           cutmix_alpha=1.0, num_threads=8, seed=0)
    for epoch in range(epochs):
        for images, targets in loader:   # NCHW float, (B, K) float32
            ...

A thin layer over ``nvidia.dali.plugin.pytorch.DALIGenericIterator`` and the
graphs of :mod:`gpumix.pipelines`; mixing options are gpumix.MixConfig's.

Last batch (``last_batch_policy``), for N samples and batch size B:

    policy     len(loader)      the epoch's last batch
    "partial"  ceil(N / B)      the N mod B real samples, mixed among themselves
    "drop"     floor(N / B)     dropped when N mod B != 0 (read, not returned)
    "fill"     ceil(N / B)      full size: the real samples mixed among
                                themselves, then repeats of the last sample
                                (unmixed, their targets its smoothed one-hot)

Every sample is a primary exactly once per epoch (with "drop", all but the
dropped tail). A loop left early (``break``) resumes where it stopped, like a
generator; call ``reset()`` to start the next epoch instead. ``train=False``
gives the validation pipeline (resize so that both sides cover the crop /
0.875, centre crop, no mixing) yielding ``(images, labels)``. Targets have
``num_classes`` columns: by default the number of class folders (empty ones
included) or, with a file list, its largest label + 1. A file listed more
than once is read under distinct spellings of its path
(gpumix.pipelines.distinct_paths), so no repeat is taken for padding.

Errors: a missing or empty folder fails at construction; an image DALI cannot
decode fails the iteration with a RuntimeError naming the file (found by
re-reading the dataset with Pillow once DALI has reported a decoding error,
since DALI's own message does not name it; other errors pass unchanged).
Errors of gpumix's params operator (e.g. a label outside [0, num_classes))
are raised after the batch that met them (gpumix.dali.raise_pending).

Devices: on the CPU the pipeline mixes and normalises by default. On the GPU
(or with ``handoff=True``) it ends at the uint8 crops, the targets and the
params table, and each batch is mixed, normalised and laid out at the
hand-off by :func:`gpumix.torch.apply`: on the GPU one CUDA launch on torch's
current stream, with no host synchronisation; on the CPU its twin. Both
store the same values, so the choice changes speed, never batches.

Distributed: each rank reads its shard, from ``shard_id``/``num_shards`` or,
when both are left out, from torch.distributed's rank and world size. The
reader shuffles the whole dataset every epoch with ``seed`` (the same on all
ranks), so an epoch's shards are disjoint and cover the data; each shard's
last batch is padded by DALI and the padding is dropped (policy "partial") or
left unmixed ("fill"). Every rank makes the same number of steps, those of
the largest shard (N in the table is ceil(N_all / num_shards)), so a rank
whose shard is one sample smaller gets a last batch one sample short: with
"partial" it may hold no sample at all. Use "fill" where every step must
see B samples on every rank. Mixing draws from a per-rank pipeline seed
derived from ``seed`` and the rank (:func:`rank_seed`).

Resumption: ``state_dict()`` returns DALI's checkpoint (reader position,
random operators' states, iterator counters); a loader built with
``checkpoint=`` that string continues bit for bit.

Outputs (training), as gpumix.torch.Mixup returns them:

    default                 (images, targets)       targets (B, K) float32
    split_targets=True      (images, (y_a, y_b, lam))  (B,) int64, int64, float32
    return_clean=True       (images, targets, clean, clean_targets)
    return_params=True      ... then a dict of the batch's params

Split targets are each sample's class id, its partner's and the label
weight (``lam``, or ``label_lam`` of it), for losses mixed per term. The
clean batch (RegMixup, RankMixup) is the same crops unmixed, normalised
alike, with their smoothed one-hot targets (split: their class ids): no
second read, decode or augmentation. The params dict holds labels, pair,
lam, method, box, and mask with a mask method, e.g. for logging or for
checking the mixing. Labels are the folders' class ids; other target kinds
(dense, multi-label, regression) are refused here: use gpumix.dali in a
pipeline of your own, or gpumix.torch.Mixup.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gpumix import dali_cpu, pipelines
from gpumix.backend import resolve_device

LAST_BATCH_POLICIES = ("partial", "drop", "fill")
TARGET_OPTIONS = ("split_targets", "return_clean", "label_lam")  # the operators', not MixConfig's
SPLIT_NAMES = ("targets_a", "targets_b", "label_lam")  # the iterator's names of split targets


def find_unreadable(files, num_threads: int = 8, chunk: int = 64) -> str | None:
    """First file (in list order) that Pillow cannot fully decode, or None.
    Files are decoded ``chunk`` at a time on ``num_threads`` threads, and the
    search stops at the first chunk holding a broken one."""
    from PIL import Image

    def broken(path):
        try:
            with Image.open(path) as image:
                image.load()
            return None
        except Exception as error:  # any decode/IO failure names the file
            return f"{path} ({type(error).__name__}: {error})"

    files = list(files)
    with ThreadPoolExecutor(num_threads) as pool:
        for start in range(0, len(files), chunk):
            for result in pool.map(broken, files[start:start + chunk]):
                if result is not None:
                    return result
    return None


def suspects(files, order, shard_id: int, num_shards: int, read: int, first_epoch: bool):
    """The files that may hold a decoding error met after ``read`` samples of
    this shard's epoch, most likely first: in the first epoch the reader's
    order is known, so the shard's files from the read position on (then the
    rest); later epochs are reshuffled by DALI, so every file."""
    n = len(files)
    start = n * shard_id // num_shards
    if not first_epoch:
        return files
    return [files[i] for i in np.roll(order, -((start + read) % n))]


def resolve_shard(shard_id, num_shards) -> tuple[int, int]:
    """(shard_id, num_shards): given, else torch.distributed's rank and world size."""
    if shard_id is None and num_shards is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    shard_id = 0 if shard_id is None else shard_id
    num_shards = 1 if num_shards is None else num_shards
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards={num_shards}), got {shard_id!r}")
    return shard_id, num_shards


def rank_seed(seed: int, shard_id: int) -> int:
    """The pipeline seed of one shard: every rank its own mixing stream from one user
    seed (the reader's shuffling uses ``seed`` itself, the same on every rank)."""
    return int(np.random.SeedSequence([seed, shard_id]).generate_state(1)[0] & 0x7FFFFFFF)


class DALIMixLoader:
    """Mixed training batches (or validation batches) from a DALI pipeline."""

    def __init__(self, data=None, *, file_list=None, batch_size: int = 64,
                 num_classes: int | None = None, size=224, train: bool = True,
                 mixing="gpumix", num_threads: int = 2, seed: int = 0,
                 device: str = "auto", last_batch_policy: str = "partial",
                 channels_last: bool = False, dtype=torch.float32, shuffle: bool = True,
                 shard_id: int | None = None, num_shards: int | None = None,
                 checkpoint: bytes | str | None = None,
                 return_params: bool = False, handoff: bool | None = None, **mix_options):
        if (data is None) == (file_list is None):
            raise ValueError("give exactly one of data (a folder root/class/image) "
                             "or file_list")
        if last_batch_policy not in LAST_BATCH_POLICIES:
            raise ValueError(f"last_batch_policy must be one of {LAST_BATCH_POLICIES}, "
                             f"got {last_batch_policy!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        if dtype not in (torch.float32, torch.float16):
            raise TypeError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
        if "targets" in mix_options:
            raise ValueError("targets: the loader's labels are its folders' (or file list's) "
                             "class ids; for dense, multi-label or regression targets call "
                             "gpumix.dali.mix_normalize in your own pipeline, or "
                             "gpumix.torch.Mixup on the batches")
        self.split_targets = bool(mix_options.get("split_targets", False))
        self.return_clean = bool(mix_options.get("return_clean", False))
        if (self.split_targets or self.return_clean) and not (train and mixing == "gpumix"):
            raise ValueError("split_targets and return_clean need train=True and "
                             "mixing='gpumix'")
        shard_id, num_shards = resolve_shard(shard_id, num_shards)
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be an int or (H, W) of positive ints, got {size!r}")
        if data is not None:
            files, labels, self.classes = pipelines.dataset_files(data)
        else:
            files, labels = pipelines.read_file_list(file_list)
            self.classes = None
        top = max(labels) + 1  # a folder's classes include the empty ones
        default = top if self.classes is None else len(self.classes)
        self.num_classes = default if num_classes is None else num_classes
        if min(labels) < 0 or top > self.num_classes:
            raise ValueError(f"labels must be in [0, num_classes={self.num_classes}), "
                             f"the data has labels up to {top - 1}")
        self.files = files
        self.shard_id, self.num_shards = shard_id, num_shards
        self.batch_size = batch_size
        self.train = train
        self.channels_last = channels_last
        self.return_params = return_params and train and mixing == "gpumix"
        self.device_choice = resolve_device(device)
        # Mixing and normalising at the hand-off: the default on the GPU.
        if handoff is None:
            handoff = self.device_choice.device == "gpu"
        self._handoff = bool(handoff) and train and mixing in ("gpumix", "none")
        self._with_table = self._handoff and mixing == "gpumix"
        self._dtype = dtype
        self._size = size
        self.last_batch_policy = last_batch_policy
        self.num_threads = num_threads
        largest_shard = -(-len(files) // num_shards)
        if last_batch_policy == "drop" and largest_shard < batch_size:
            raise ValueError(f"last_batch_policy='drop' leaves no batch: batch_size="
                             f"{batch_size} exceeds the {largest_shard} samples of a shard "
                             f"({len(files)} samples in {num_shards} shard(s))")
        # "drop" runs as DALI's "partial" and leaves out the epoch's short last
        # batch itself (module docstring); only when the largest shard does not
        # fill its last batch is there one on every rank.
        self._drop_short = last_batch_policy == "drop" and largest_shard % batch_size != 0
        self._drop_length = largest_shard // batch_size

        from nvidia.dali import types

        dali_dtype = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
        graph = dict(size=size, dtype=dali_dtype, shard_id=shard_id, num_shards=num_shards)
        if train:
            graph.update(num_classes=self.num_classes, mixing=mixing, shuffle=shuffle,
                         mix_options=mix_options, return_params=self.return_params,
                         reader_seed=seed, handoff=self._handoff)
        elif mix_options:
            raise ValueError(f"mixing options {sorted(mix_options)} need train=True")
        device_id = torch.cuda.current_device() if self.device_choice.device == "gpu" else None
        self._pipe = pipelines.build_pipeline(
            files, labels, train=train, batch_size=batch_size, num_threads=num_threads,
            seed=rank_seed(seed, shard_id), device=self.device_choice.device, device_id=device_id,
            checkpoint=checkpoint, layout="HWC" if channels_last else "CHW", **graph)
        self._outputs = ["images"] + (list(SPLIT_NAMES) if self.split_targets else
                                      ["targets" if train else "labels"])
        if self.return_clean:  # at the hand-off the crops themselves are the clean images
            self._outputs += ["clean_targets"] if self._handoff else ["clean", "clean_targets"]
        if self.return_params:
            from gpumix.config import MixConfig
            from gpumix.dali import param_names

            config_options = {k: v for k, v in mix_options.items() if k not in TARGET_OPTIONS}
            self._param_names = param_names(MixConfig(num_classes=self.num_classes,
                                                      **config_options))
        if self._with_table:
            self._outputs.append("table")
        elif self.return_params:
            self._outputs += list(self._param_names)
        self._order = pipelines.reading_order(len(files), shuffle=train and shuffle,
                                              reader_seed=seed)
        self._read = 0  # samples returned in this epoch
        self._epochs = 0  # epochs finished
        self._iterator = self._guarded(self._make_iterator)
        self._mid_epoch = False

    # ------------------------------------------------------------ plumbing
    def _make_iterator(self):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        # DALI's own DROP repeats the padding of uneven shards in the next epoch
        policy = {"partial": LastBatchPolicy.PARTIAL, "drop": LastBatchPolicy.PARTIAL,
                  "fill": LastBatchPolicy.FILL}[self.last_batch_policy]
        return DALIGenericIterator(self._pipe, self._outputs,
                                   reader_name=pipelines.READER_NAME, last_batch_policy=policy,
                                   auto_reset=True)

    def _guarded(self, step):
        """Run a DALI step; when DALI reports a decoding error, name the file."""
        try:
            return step()
        except StopIteration:
            raise
        except RuntimeError as error:
            if "decod" not in str(error).lower():
                raise
            culprit = find_unreadable(
                suspects(self.files, self._order, self.shard_id, self.num_shards, self._read,
                         first_epoch=self._epochs == 0), self.num_threads)
            if culprit is not None:
                raise RuntimeError(f"cannot decode image {culprit}") from error
            raise

    def _targets(self, batch: dict):
        """The targets item: soft targets, labels (validation), or split
        ``(y_a, y_b, lam)`` as flat (B,) tensors."""
        if not self.train:
            return batch["labels"].reshape(-1)
        if not self.split_targets:
            return batch["targets"]
        y_a, y_b, lam = (batch[name].reshape(-1) for name in SPLIT_NAMES)
        return y_a.long(), y_b.long(), lam

    def _clean_targets(self, batch: dict):
        clean = batch["clean_targets"]
        return clean.reshape(-1).long() if self.split_targets else clean

    def _nchw(self, images):
        """DALI wrote NHWC with channels_last: a free NCHW view in channels_last memory."""
        return images.permute(0, 3, 1, 2) if self.channels_last else images

    def _to_torch(self, batch: dict):
        if self._handoff:
            return self._hand_off(batch)
        items = (self._nchw(batch["images"]), self._targets(batch))
        if self.return_clean:
            items += (self._nchw(batch["clean"]), self._clean_targets(batch))
        if self.return_params:
            params = {k: batch[k] for k in self._param_names}
            params = {k: (v if k in ("box", "mask") else v.reshape(-1))
                      for k, v in params.items()}
            items += (params,)
        return items

    def _hand_off(self, batch: dict):
        """Mix, normalise and lay out DALI's uint8 crops in one CUDA launch
        (a second one normalises the clean batch, with ``return_clean``)."""
        from gpumix.torch import apply, identity_table

        images = batch["images"]
        identity = identity_table(images.shape[0], self._size) \
            if self.return_clean or not self._with_table else None
        layout = dict(mean=pipelines.IMAGENET_MEAN, std=pipelines.IMAGENET_STD,
                      channels_last=self.channels_last, dtype=self._dtype)
        rows = batch["table"] if self._with_table else identity
        mixed, masks, boxes = apply(images, rows, return_applied=True, **layout)
        items = (mixed, self._targets(batch))
        if self.return_clean:
            items += (apply(images, identity, **layout), self._clean_targets(batch))
        if not self.return_params:
            return items
        from gpumix.dali import PARAM_COLUMNS

        table = batch["table"]
        params = {name: table[:, start:start + width].reshape(-1) if width == 1
                  else table[:, start:start + width] for name, (start, width) in
                  PARAM_COLUMNS.items()}
        params = {"labels": params["labels"].long(), "pair": params["pair"].long(),
                  "lam": params["lam"].float(), "method": params["method"].to(torch.int8),
                  "box": boxes}
        if "mask" in self._param_names:  # zeros for a batch where no sample used one
            params["mask"] = masks if masks is not None else torch.zeros(
                images.shape[:3], dtype=torch.float32, device=images.device)
        return items + (params,)

    # ------------------------------------------------------------ public
    def __len__(self) -> int:
        return self._drop_length if self.last_batch_policy == "drop" else len(self._iterator)

    def __iter__(self):
        while True:
            try:
                batch = self._guarded(lambda: next(self._iterator))
            except StopIteration:
                self._mid_epoch = False
                self._epochs += 1
                self._read = 0
                return
            self._mid_epoch = True
            samples = batch[0]["images"].shape[0]
            self._read += samples
            dali_cpu.raise_pending(self._pipe)  # the fast params step's errors
            if self._drop_short and samples < self.batch_size:
                continue  # "drop": the epoch's last batch, read and left out
            yield self._to_torch(batch[0])

    def reset(self) -> None:
        """Make the next loop start a new epoch.

        DALI cannot rewind mid-epoch, so the rest of an epoch left early is
        read and discarded; at an epoch boundary this does nothing.
        """
        if self._mid_epoch:
            for _ in self:
                pass

    def state_dict(self) -> bytes:
        """DALI checkpoint of pipeline and iterator; pass as ``checkpoint=`` to resume."""
        return self._iterator.checkpoints()[0]

    @property
    def device(self) -> str:
        return self.device_choice.device
