"""KOALA with torch.distributed: DDP (or FSDP2) takes the steps one process takes on the whole batch.

    torchrun --standalone --nproc_per_node=2 -m koala_triton.examples.ddp [--fsdp] [--variant M|V|PP] [--steps 100]

Each rank trains on its own share of every batch (a DistributedSampler's job in a real run).
The optimizer reduces the loss statistics over the ranks by itself (one all-reduce of three
float64 numbers per step; with ``--fsdp`` the sharded parameters' norms, and KOALA++'s dot
products, ride along), so the loop is the single-process README loop unchanged. Backend: nccl
on GPUs (one per rank, from ``LOCAL_RANK``), gloo on the CPU. At the end every rank checks that
its filter (KOALA++: and its per-tensor filters) is bit for bit the others'.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from koala_triton import KoalaM, KoalaPlusPlus, KoalaV

VARIANTS = {"M": KoalaM, "V": KoalaV, "PP": KoalaPlusPlus}


def _model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(device)


def _batch(step: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's whole batch (the same on every rank): 4 classes, separable by a random map."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(size, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=torch.Generator().manual_seed(-1))).argmax(1)
    return x.to(device), y.to(device)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64, help="samples per step over all ranks")
    parser.add_argument("--variant", choices=list(VARIANTS), default="M", help="KoalaM, KoalaV or KoalaPlusPlus")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 instead of DDP")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    own_group = not dist.is_initialized()
    if own_group:  # under torchrun: rank, world size and the rendezvous come from the environment
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = _model(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = VARIANTS[args.variant](model.parameters())

    share = args.batch // world
    loss = torch.zeros((), device=device)
    for step in range(1, args.steps + 1):
        x, y = _batch(step, share * world, device)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]  # this rank's share
        opt.predict()  # the time update, before the forward pass
        losses = F.cross_entropy(model(x), y, reduction="none")  # this rank's per-sample losses
        opt.zero_grad()
        losses.mean().backward()  # DDP / FSDP2 average the gradients over the ranks
        opt.step(loss=losses.detach())  # KOALA reduces the loss statistics over the ranks
        loss = losses.detach().mean()
        if step % max(args.steps // 5, 1) == 0 or step == args.steps:
            dist.all_reduce(loss)  # only for printing: the mean loss over the ranks
            loss /= world
            if rank == 0:
                print(f"step {step:4d}  loss {float(loss):.4f}")

    filters = {**opt.filter_state, **getattr(opt, "tensor_filters", {})}  # KOALA++: one filter per tensor too
    values = torch.cat([v.double().reshape(-1) for v in filters.values()])
    gathered = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(gathered, values)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        print(f"{world} ranks, {'FSDP2' if args.fsdp else 'DDP'}: filters identical on all ranks: {same}")
    if own_group:
        dist.barrier()  # every rank done with the group before any tears it down (gloo)
        dist.destroy_process_group()
    if not same:
        raise SystemExit("the ranks' filters differ")
    return float(loss)


if __name__ == "__main__":
    main()
