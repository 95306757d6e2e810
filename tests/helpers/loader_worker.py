"""Runs DALIMixLoader in its own process for the distributed and resume tests.

    python loader_worker.py ddp RANK WORLD INIT_FILE FILE_LIST OUT_JSON
    python loader_worker.py save FILE_LIST STATE_FILE EXPECTED_FILE
    python loader_worker.py resume FILE_LIST STATE_FILE OUT_FILE
"""

import json
import sys

import torch
import torch.distributed as dist

from gpumix.torch import DALIMixLoader

OPTIONS = dict(batch_size=4, size=16, mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0,
               mode="elem", pairing="permutation", return_params=True, seed=3)


def two_epochs(loader):
    """Each epoch's primaries (real samples), lams and step count."""
    epochs = []
    for _ in range(2):
        primaries, lams, steps = [], [], 0
        for images, targets, params in loader:
            labels = params["labels"].tolist()
            n_real = len(dict.fromkeys(labels))
            primaries += labels[:n_real]
            lams += params["lam"].tolist()
            steps += 1
        epochs.append({"primaries": primaries, "lams": lams, "steps": steps})
    return epochs


def ddp(rank, world, init_file, file_list, out):
    dist.init_process_group("gloo", rank=int(rank), world_size=int(world),
                            init_method=f"file://{init_file}")
    loader = DALIMixLoader(file_list=file_list, **OPTIONS)  # shard from torch.distributed
    epochs = two_epochs(loader)
    # A second loader with the same seed and world size, from scratch.
    again = two_epochs(DALIMixLoader(file_list=file_list, **OPTIONS))
    dist.barrier()
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump({"rank": int(rank), "len": len(loader), "shard": [loader.shard_id,
                   loader.num_shards], "epochs": epochs, "again": again}, f)


def take(loader, count):
    """The next ``count`` batches, across epoch boundaries, like a training loop."""
    batches = []
    while len(batches) < count:
        for batch in loader:
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def save(file_list, state_file, expected_file):
    loader = DALIMixLoader(file_list=file_list, **OPTIONS)
    take(loader, 7)  # past the first epoch (6 batches) into the second
    with open(state_file, "wb") as f:
        f.write(loader.state_dict())
    torch.save(take(loader, 8), expected_file)  # across the next epoch boundary too


def resume(file_list, state_file, out_file):
    with open(state_file, "rb") as f:
        state = f.read()
    loader = DALIMixLoader(file_list=file_list, checkpoint=state, **OPTIONS)
    torch.save(take(loader, 8), out_file)


if __name__ == "__main__":
    {"ddp": ddp, "save": save, "resume": resume}[sys.argv[1]](*sys.argv[2:])
