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
unchanged (``prepare``: the key is a cheap per-step ``signature`` of addresses, element counts
and non-contiguous strides). Parameters whose arrays are not all
dense with identical strides are *staged*: a contiguous buffer per array, cached per tensor,
is copied in before the passes and copied back after (extra copy launches for those tensors
only; channels-last and transposed parameters are dense and need none).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import constants
from .launch import Blocks

#: Columns of a row (defined once, in ``constants.py``, where the kernels read them too).
COL_X, COL_G, COL_U, COL_A = (c.value for c in (constants.COL_X, constants.COL_G, constants.COL_U, constants.COL_A))
COL_NUMEL, COL_SLOT, NCOL = (c.value for c in (constants.COL_NUMEL, constants.COL_SLOT, constants.NCOL))

ROLES = ("x", "g", "u", "a")
_NONE_TYPE = type(None)
_MAX_TABLES = 8  # per pass kind; grads reallocated by zero_grad(set_to_none=True) may churn keys


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
    numel: int  # elements of all rows
    #: [k, 2] int64 by slot: (first global chunk, number of chunks); None without slots.
    slot_chunks: Tensor | None
    keep: list = field(default_factory=list)  # host sources of in-flight uploads
    #: Host: the rows in chunk order (grouped by dtype), and each row's chunk count (by row).
    row_order: list[int] = field(default_factory=list)
    row_chunks: list[int] = field(default_factory=list)
    #: Device tensors derived from the table on demand (``shards.py``), cached with it.
    derived: dict = field(default_factory=dict)


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
class TableCache:
    """Prepared tables per pass kind and signature, and staging buffers per tensor.

    Attributes:
        entries: pass kind -> signature -> ``Prepared`` (least recently used first).
        staging: (owner id, role) -> the contiguous buffer an odd-layout array is staged in.
    """

    entries: dict[str, OrderedDict] = field(default_factory=dict)
    staging: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    #: chunk layouts by (dtype, element count, slot) of every row: they depend on sizes only,
    #: so new addresses (a gradient reallocated by ``zero_grad(set_to_none=True)``) rebuild
    #: only the O(k) rows of a table, not its chunks.
    layouts: OrderedDict = field(default_factory=OrderedDict)
    #: ``prepare`` calls answered from ``entries`` / building tables; ``layout_misses``: of the
    #: builds, those that also built a chunk layout.
    hits: int = 0
    misses: int = 0
    layout_misses: int = 0

    def info(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "layout_misses": self.layout_misses}


@dataclass
class Prepared:
    """The tables of one pass (or of two passes over the same rows) and the staging copies of
    its odd-layout tensors; cached per step signature (``prepare``).

    Holds no reference to the caller's tensors (a cached gradient would keep its storage
    alive, and the next step's gradient would land at another address): staging copies are
    rebuilt each step from the arrays passed in.

    Attributes:
        tables: what ``build`` returned.
        staged: (buffer, role, row, copied back) per staged array.
    """

    tables: tuple
    staged: list[tuple[Tensor, str, int, bool]]

    def stage_in(self, arrays: dict[str, list[Tensor | None]]) -> None:
        for buf, role, row, _ in self.staged:
            buf.copy_(arrays[role][row])

    def stage_back(self, arrays: dict[str, list[Tensor | None]]) -> None:
        for buf, role, row, back in self.staged:
            if back:
                arrays[role][row].copy_(buf)


def signature(arrays: dict[str, list[Tensor | None]], roles: tuple[str, ...]) -> tuple:
    """A cheap per-step key of the storages ``roles`` of ``arrays`` point to.

    Every address, every element count of the first role (the parameters), and the strides and
    shapes of all tensors of a role in which any is not contiguous: what decides the rows, the
    chunks and whether a tensor is used in place. (Shapes of contiguous tensors need not be
    keyed: a contiguous gradient has its parameter's element count, which torch's ``.grad``
    setter enforces, and the kernels see only addresses and counts.)
    """
    parts = [tuple(map(Tensor.numel, arrays[roles[0]]))]
    for role in roles:
        ts = arrays[role]
        if _NONE_TYPE in map(type, ts):  # rows without this role (fold mode's gradients)
            parts.append(tuple([0 if t is None else t.data_ptr() for t in ts]))
            contiguous = all([t is None or t.is_contiguous() for t in ts])
        else:  # map over a method descriptor: the loop runs in C
            parts.append(tuple(map(Tensor.data_ptr, ts)))
            contiguous = all(map(Tensor.is_contiguous, ts))
        if not contiguous:
            parts.append(tuple([None if t is None else (t.stride(), t.shape) for t in ts]))
    return tuple(parts)


#: What each role is, for error messages.
_ROLE_NAMES = {"x": "parameter", "g": "gradient", "u": "velocity (state['velocity'])",
               "a": "weight average (state['xavg'])"}


def check_row(index: int, row: dict[str, Tensor]) -> None:
    """Refuse a row whose arrays do not all match its parameter's dtype, element count and
    device: a kernel would read and write them as the parameter's type and length.

    Raises:
        ValueError: naming the tensor (its position among the step's tensors, its role) and
            what differs; nothing has been launched yet.
    """
    x = row.get("x")
    if x is None:
        return
    dtype, numel, device = x.dtype, x.numel(), x.device
    for role, t in row.items():
        if role == "x" or t is None or (t.dtype == dtype and t.numel() == numel and t.device == device):
            continue
        what = f"the {_ROLE_NAMES[role]} of tensor {index} (a parameter of shape {tuple(x.shape)})"
        if t.dtype != x.dtype:
            raise ValueError(
                f"{what} is {t.dtype} but the parameter is {x.dtype}: was the model converted to "
                "another dtype after the optimizer was built? Build the optimizer after converting "
                "the model (or load a state_dict into a new one)"
            )
        if t.numel() != x.numel():
            raise ValueError(
                f"{what} has {t.numel()} elements but the parameter has {x.numel()}: was the "
                "parameter resized or replaced after the optimizer was built?"
            )
        if t.device != x.device:
            raise ValueError(f"{what} is on {t.device} but the parameter is on {x.device}")


def _bind(cache: TableCache, owners: list[Tensor], arrays: dict[str, list[Tensor | None]],
          mutated: tuple[str, ...]) -> tuple[list[dict[str, Tensor]], list[tuple[Tensor, str, int, bool]]]:
    """Pick, per tensor, its own storages (dense, same strides, 16-byte aligned) or staging
    buffers (cached per owner in ``cache.staging``), after checking that its arrays match the
    parameter (``check_row``). Runs whenever the signature of the arrays changes: a model
    converted to another dtype, or a parameter replaced, moves the parameter's storage.

    Returns:
        rows: [n] dicts role -> the tensor a pass addresses (the caller's or a buffer).
        staged: (buffer, role, row, copied back) for each staged array.
    """
    stage = cache.staging
    rows, staged = [], []
    for i in range(len(owners)):
        row = {role: arrays[role][i] for role in arrays if arrays[role][i] is not None}
        check_row(i, row)
        # the common case first: contiguous (so one layout: equal element counts were checked)
        # and 16-byte aligned
        if all([t.is_contiguous() and not t.data_ptr() & 15 for t in row.values()]):
            rows.append(row)
            continue
        layout = _layout(next(iter(row.values())))
        if all(_dense(t) and _layout(t) == layout and _aligned(t) for t in row.values()):
            rows.append(row)
            continue
        bufs = {}
        for role, t in row.items():
            key = (id(owners[i]), role)
            buf = stage.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
                buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                stage[key] = buf
            staged.append((buf, role, i, role in mutated))
            bufs[role] = buf
        rows.append(bufs)
    return rows, staged


def prepare(cache: TableCache, kind: str, owners: list[Tensor], arrays: dict[str, list[Tensor | None]],
            mutated: tuple[str, ...], keyed: tuple[str, ...], build, extra_key=()) -> Prepared:
    """The cached tables of a pass over ``arrays`` (role -> [n] tensors, None: absent).

    Args:
        owners: [n] the parameters (stable objects: staging buffers are cached per owner).
        mutated: roles the pass writes (their staging buffers are copied back).
        keyed: roles whose storages may change between steps (the parameters first, then the
            gradients); the others (KOALA-M's state) are the optimizer's own tensors, replaced
            only by ``load_state_dict``, after which the optimizer starts a new cache.
        build: (rows, cache) -> tuple of Tables, run only when the signature is new.
        extra_key: anything else the tables depend on (e.g. the slots).
    """
    key = (extra_key, signature(arrays, keyed))
    entries: OrderedDict = cache.entries.setdefault(kind, OrderedDict())
    hit = entries.get(key)
    if hit is not None:
        entries.move_to_end(key)
        cache.hits += 1
        return hit
    cache.misses += 1
    rows, staged = _bind(cache, owners, arrays, mutated)
    result = Prepared(tables=tuple(build(rows, cache)), staged=staged)
    entries[key] = result
    while len(entries) > _MAX_TABLES:
        entries.popitem(last=False)
    return result


def _upload(values: list[int], device: torch.device, keep: list) -> Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        keep.append(host)  # the copy is asynchronous: the source must outlive it
        return host.to(device, non_blocking=True)
    return host


@dataclass
class _ChunkLayout:
    """What a table's chunks depend on: sizes and slots, not addresses (see ``table``).

    Attributes:
        groups: per dtype (dtype, row indices in the group's order, chunk tensor [c, 2],
            number of chunks, first global chunk).
        slot_chunks: [k, 2] int64 (first global chunk, chunks) by slot, or None.
        n_chunks: chunks of all groups.
        keep: host sources of in-flight uploads.
    """

    groups: list[tuple[torch.dtype, list[int], Tensor, int, int]]
    slot_chunks: Tensor | None
    n_chunks: int
    keep: list


def _chunk_layout(sizes: tuple, num_slots: int, blocks: Blocks, device: torch.device) -> _ChunkLayout:
    """Chunks of rows of the given (dtype, element count, slot), grouped by dtype."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, (dtype, _, _) in enumerate(sizes):
        by_dtype.setdefault(dtype, []).append(i)
    keep: list = []
    groups = []
    slot_chunks = [[0, 0] for _ in range(num_slots)]
    base = 0
    for dtype, members in by_dtype.items():
        chunks = []
        for j, i in enumerate(members):
            _, numel, slot = sizes[i]
            n_row = -(-numel // blocks.chunk)
            if slot >= 0:
                slot_chunks[slot] = [base + len(chunks), n_row]
            chunks.extend([j, c * blocks.chunk] for c in range(n_row))
        flat_chunks = [v for c in chunks for v in c]
        groups.append((dtype, members, _upload(flat_chunks or [0, 0], device, keep), len(chunks), base))
        base += len(chunks)
    slot_tensor = _upload([v for s in slot_chunks for v in s] or [0, 0], device, keep) if num_slots else None
    return _ChunkLayout(groups=groups, slot_chunks=slot_tensor, n_chunks=base, keep=keep)


_MAX_LAYOUTS = 8


def table(
    arrays: list[dict[str, Tensor]],
    slots: list[int],
    num_slots: int,
    blocks: Blocks,
    device: torch.device,
    cache: TableCache | None = None,
) -> Table:
    """Build the table of ``arrays`` (one dict of role -> tensor per row) and upload it.

    The chunk layout (which depends on the rows' dtypes, sizes and slots only) comes from
    ``cache`` when it has it; the rows (addresses) are built each time: O(k).

    Args:
        slots: [n] slot of each row, or -1.
        num_slots: k; ``slot_chunks`` gets k rows (slots without a row get 0 chunks).
    """
    firsts = [next(iter(row.values())) for row in arrays]
    sizes = tuple((t.dtype, t.numel(), slot) for t, slot in zip(firsts, slots))
    key = (sizes, num_slots, blocks.chunk, device)
    layout = cache.layouts.get(key) if cache is not None else None
    if layout is None:
        layout = _chunk_layout(sizes, num_slots, blocks, device)
        if cache is not None:
            cache.layout_misses += 1
            cache.layouts[key] = layout
            while len(cache.layouts) > _MAX_LAYOUTS:
                cache.layouts.popitem(last=False)
    elif cache is not None:
        cache.layouts.move_to_end(key)
    keep: list = list(layout.keep)
    groups = []
    for dtype, members, chunks, n_chunks, base in layout.groups:
        flat_rows = []
        for i in members:
            row = arrays[i]
            ptrs = [row[r].data_ptr() if r in row else 0 for r in ROLES]
            if "g" not in row and "x" in row:
                ptrs[COL_G] = ptrs[COL_X]  # never read (masked), but a valid address
            flat_rows.extend(ptrs)
            flat_rows.extend((sizes[i][1], sizes[i][2]))
            flat_rows.extend([0] * (NCOL - 6))
        groups.append(Group(dtype=dtype, rows=_upload(flat_rows, device, keep), chunks=chunks,
                            n_chunks=n_chunks, chunk_base=base))
    numel = sum(t.numel() for t in firsts)
    return Table(groups=groups, n_chunks=layout.n_chunks, numel=numel, slot_chunks=layout.slot_chunks, keep=keep,
                 row_order=[i for _, members, _, _, _ in layout.groups for i in members],
                 row_chunks=[-(-size[1] // blocks.chunk) for size in sizes])
