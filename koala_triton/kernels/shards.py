"""Per-row views of a table's per-chunk partial sums, for the distributed path (pure torch).

With DTensor parameters on several ranks (FSDP2), a tensor's sums must be added over ranks
before the filter kernel uses them, but each rank's chunks cover only its shard, so chunk
partials cannot be added across ranks. These helpers turn them into per-row values, which can:

- ``row_sums``: [rows, 3] each row's chunk partials added in chunk order (``segment_reduce``:
  one sequential sum per row, deterministic on every device), in row order; a measured
  table's row is its slot. The sums, reduced over ranks, reach the filter kernel as partials
  of one chunk per slot (``one_chunk_per_slot``), so the kernel itself is unchanged: it adds
  each slot's single partial to 0, exactly.
- ``chunk_mask``: [c] a per-row flag repeated over each row's chunks (KOALA-M's distance
  partials: which chunks this rank contributes).

Derived device tensors are cached on the table (``Table.derived``), uploaded once per table.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tables import Table


def _to_device(table: Table, values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
        table.keep.append(host)  # the copy is asynchronous: the source must outlive it
    return host.to(device, non_blocking=True)


def _upload(table: Table, key: str, values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``table.derived[key]``, or ``values()`` uploaded there (pinned, asynchronous on CUDA)."""
    cached = table.derived.get(key)
    if cached is None:
        cached = table.derived[key] = _to_device(table, values(), dtype, device)
    return cached


def _positions(order: list[int]) -> list[int]:
    """Where each row's sums are among the rows in ``order``."""
    position = [0] * len(order)
    for j, i in enumerate(order):
        position[i] = j
    return position


def row_sums(table: Table, partials: Tensor) -> Tensor:
    """[rows, 3] float64: each row's chunk partials (``partials`` [≥ c, 3], flat or not) added
    in chunk order, rows in the order the table was built from (a measured table: slots)."""
    device = partials.device
    order = table.row_order
    lengths = _upload(table, "lengths", lambda: [table.row_chunks[i] for i in order], torch.int64, device)
    # unsafe: lengths sum to c by construction (the check would read them on the host)
    sums = torch.segment_reduce(partials.reshape(-1)[:3 * table.n_chunks].view(-1, 3), "sum",
                                lengths=lengths, axis=0, unsafe=True)
    if len(table.groups) < 2:  # one dtype: chunk order is row order
        return sums
    return sums.index_select(0, _upload(table, "positions", lambda: _positions(order), torch.int64, device))


def chunk_mask(table: Table, row_flags: tuple[bool, ...], device: torch.device) -> Tensor:
    """[c] bool: ``row_flags[row]`` for each chunk of the table (in chunk order); cached per
    table for one flags tuple (an optimizer's, fixed while its parameter list is)."""
    hit = table.derived.get("chunk_mask")
    if hit is None or hit[0] is not row_flags:
        flags = [row_flags[i] for i in table.row_order for _ in range(table.row_chunks[i])]
        hit = table.derived["chunk_mask"] = (row_flags, _to_device(table, flags, torch.bool, device))
    return hit[1]


def one_chunk_per_slot(table: Table, num_slots: int, device: torch.device) -> Tensor:
    """[k, 2] int64 slot -> (first chunk, chunk count) = (slot, 1): the filter kernel's slot
    table for per-slot sums given as one partial each."""
    return _upload(table, "one_chunk_per_slot", lambda: [v for s in range(num_slots) for v in (s, 1)] or [0, 0],
                   torch.int64, device)
