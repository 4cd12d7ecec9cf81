"""Host side of the multi-tensor passes: pointer tables, chunk tables, staging (pure torch).

One *row* per parameter tensor: the addresses of its arrays (weights x, gradient g, velocity
u, weight average xavg), its element count and its *slot* (the tensor's index in the step
plan, where its per-tensor values live: lr, weight decay, eps, gains; -1 for a tensor that is
not measured this step). One *chunk* per ``Blocks.chunk`` elements of a row: the programs of a
pass are chunks, so a launch covers every tensor and the launch count does not depend on the
number of tensors. Rows are grouped by dtype (the element type of a pointer is a compile-time
constant), one launch per dtype present; chunks are numbered globally across the groups so
that per-chunk partial sums of all groups land in one buffer.

Tables are int64 device tensors built once and cached while the storages they point to are
unchanged (the cache key is every address and size). Parameters whose arrays are not all
dense with identical strides are *staged*: a contiguous buffer per array, cached per tensor,
is copied in before the passes and copied back after (extra copy launches for those tensors
only; channels-last and transposed parameters are dense and need none).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .launch import Blocks

#: Columns of a row. Kept in sync with the constexpr copies in ``passes.py``.
COL_X, COL_G, COL_U, COL_A, COL_NUMEL, COL_SLOT = 0, 1, 2, 3, 4, 5
NCOL = 8  # padded: a row is 64 bytes

ROLES = ("x", "g", "u", "a")
_MAX_TABLES = 8  # per table kind; grads reallocated by zero_grad(set_to_none=True) churn keys


@dataclass
class Group:
    """The rows of one dtype: what one launch of a pass covers."""

    dtype: torch.dtype
    rows: Tensor  # [n, NCOL] int64
    chunks: Tensor  # [c, 2] int64: (row within the group, first element of the chunk)
    n_chunks: int
    chunk_base: int  # global index of the group's first chunk


@dataclass
class Table:
    groups: list[Group]
    n_chunks: int  # all groups
    #: [k, 2] int64 by slot: (first global chunk, number of chunks); None without slots.
    slot_chunks: Tensor | None
    keep: list = field(default_factory=list)  # host sources of in-flight uploads


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(t: Tensor) -> tuple:
    return tuple(s for s, n in zip(t.stride(), t.shape) if n != 1)


def _aligned(t: Tensor) -> bool:
    return t.numel() == 0 or t.data_ptr() % 16 == 0


@dataclass
class Binding:
    """The storages a pass works on, and the copies that stage odd-layout tensors."""

    arrays: list[dict[str, Tensor]]
    copy_in: list[tuple[Tensor, Tensor]]
    copy_back: list[tuple[Tensor, Tensor]]

    def stage_in(self) -> None:
        for dst, src in self.copy_in:
            dst.copy_(src)

    def stage_back(self) -> None:
        for dst, src in self.copy_back:
            dst.copy_(src)


def bind(cache: dict, owners: list[Tensor], arrays: dict[str, list[Tensor | None]], mutated: tuple[str, ...]) -> Binding:
    """Pick, per tensor, its own storages (dense, same strides, 16-byte aligned) or staging buffers.

    Args:
        owners: [n] the parameters (stable objects: staging buffers are cached per owner).
        arrays: role -> [n] tensors of the owner's shape (None: the role is absent for that row).
        mutated: roles the passes write; their staging buffers are copied back.
    """
    stage = cache.setdefault("stage", {})
    out, copy_in, copy_back = [], [], []
    n = len(owners)
    for i in range(n):
        row = {role: arrays[role][i] for role in arrays if arrays[role][i] is not None}
        first = next(iter(row.values()))
        layout = _layout(first)
        if all(_dense(t) and _layout(t) == layout and _aligned(t) for t in row.values()):
            out.append(row)
            continue
        staged = {}
        for role, t in row.items():
            key = (id(owners[i]), role)
            buf = stage.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
                buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                stage[key] = buf
            copy_in.append((buf, t))
            if role in mutated:
                copy_back.append((t, buf))
            staged[role] = buf
        out.append(staged)
    return Binding(out, copy_in, copy_back)


def _upload(values: list[int], device: torch.device, keep: list) -> Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        keep.append(host)  # the copy is asynchronous: the source must outlive it
        return host.to(device, non_blocking=True)
    return host


def table(
    cache: dict,
    kind: str,
    arrays: list[dict[str, Tensor]],
    slots: list[int],
    num_slots: int,
    blocks: Blocks,
    device: torch.device,
) -> Table:
    """The (cached) table of ``arrays`` (one dict of role -> tensor per row).

    Args:
        kind: separates caches of different passes (their keys never collide anyway).
        slots: [n] slot of each row, or -1.
        num_slots: k; ``slot_chunks`` gets k rows (slots without a row get 0 chunks).
    """
    key_rows = []
    for row, slot in zip(arrays, slots):
        first = next(iter(row.values()))
        key_rows.append((first.dtype, first.numel(), slot) + tuple(
            row[r].data_ptr() if r in row else 0 for r in ROLES))
    key = (num_slots, tuple(key_rows))
    tables: OrderedDict = cache.setdefault(("tables", kind), OrderedDict())
    hit = tables.get(key)
    if hit is not None:
        tables.move_to_end(key)
        return hit

    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, row in enumerate(arrays):
        by_dtype.setdefault(next(iter(row.values())).dtype, []).append(i)
    keep: list = []
    groups = []
    slot_chunks = [[0, 0] for _ in range(num_slots)]
    base = 0
    for dtype, members in by_dtype.items():
        rows, chunks = [], []
        for j, i in enumerate(members):
            row, slot = arrays[i], slots[i]
            numel = next(iter(row.values())).numel()
            ptrs = [row[r].data_ptr() if r in row else 0 for r in ROLES]
            if "g" not in row and "x" in row:
                ptrs[COL_G] = ptrs[COL_X]  # never read (masked), but a valid address
            rows.append(ptrs + [numel, slot] + [0] * (NCOL - 6))
            n_row = -(-numel // blocks.chunk)
            if slot >= 0:
                slot_chunks[slot] = [base + len(chunks), n_row]
            chunks.extend([j, c * blocks.chunk] for c in range(n_row))
        n_chunks = len(chunks)
        flat_rows = [v for r in rows for v in r]
        flat_chunks = [v for c in chunks for v in c]
        groups.append(Group(
            dtype=dtype,
            rows=_upload(flat_rows, device, keep),
            chunks=_upload(flat_chunks or [0, 0], device, keep),
            n_chunks=n_chunks,
            chunk_base=base,
        ))
        base += n_chunks
    slot_tensor = _upload([v for s in slot_chunks for v in s] or [0, 0], device, keep) if num_slots else None
    result = Table(groups=groups, n_chunks=base, slot_chunks=slot_tensor, keep=keep)
    tables[key] = result
    while len(tables) > _MAX_TABLES:
        tables.popitem(last=False)
    return result
