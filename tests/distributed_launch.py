"""Run a function on the ranks of a gloo process group on the CPU, bounded in time.

``run_ranks(fn, world, directory, timeout, *args)`` spawns ``world`` processes, each joining one
gloo group through a ``FileStore`` in ``directory`` (no network: nothing listens on a port), runs
``fn(rank, world, *args)`` and returns what each rank returned (through ``torch.save`` files).
A rank that raises fails the call with its traceback; processes still running at ``timeout``
(seconds) are killed and the call raises ``TimeoutError``. Collectives time out after
``COLLECTIVE_TIMEOUT`` (a rank that fails leaves its peers waiting in one at most that long).
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _rank_main(rank: int, world: int, directory: str, fn, args) -> None:
    store = dist.FileStore(os.path.join(directory, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, directory, timeout: float, *args) -> list:
    """``[fn(rank, world, *args) for each rank]``, run in ``world`` spawned processes."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    context = mp.start_processes(_rank_main, args=(world, directory, fn, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world} ranks of {fn.__name__} still running after {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(os.path.join(directory, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]
