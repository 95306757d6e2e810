"""Minimal DistributedDataParallel training with DALIMixLoader.

    torchrun --nproc_per_node=2 examples/ddp_train.py --data /path/to/train

Each rank reads its own shard (DALIMixLoader asks torch.distributed for the
rank and world size), mixes with its own stream derived from --seed, and the
shards of an epoch cover the dataset exactly once. On CPU it runs with gloo;
with GPUs, nccl and device="gpu".
"""

import argparse

import torch
import torch.distributed as dist

from gpumix.torch import DALIMixLoader


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if cuda \
        else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    # "drop": every rank makes the same steps, none on an empty batch (a rank
    # whose shard is one sample smaller may end on a batch one sample short)
    loader = DALIMixLoader(args.data, batch_size=args.batch_size, size=128, seed=args.seed,
                           mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem",
                           device="gpu" if cuda else "cpu", num_threads=4,
                           last_batch_policy="drop")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(16, loader.num_classes)).to(device)
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    for epoch in range(args.epochs):
        for images, targets in loader:
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if dist.get_rank() == 0:
            print(f"epoch {epoch}: loss {loss.item():.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
