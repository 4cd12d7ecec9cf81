r"""The elementwise multi-tensor passes of KOALA (plain functions; ``launch`` compiles them).

Every pass runs one program per *chunk* of a table (``tables.py``): the program loads its row
(array addresses, element count, slot), then walks its chunk in tiles of ``BLOCK`` elements.
Loads are upcast to the compute type ``CT`` (float32, or float64 for float64 parameters), stores
cast back to the array's type ``DT``; offsets and addresses are int64.

Passes and bytes per fp32 parameter (each array read or written once):

- ``norms_kernel`` (before every measurement update): reads g, and x where weight decay is on;
  writes per-chunk partial sums of ‖g‖², ‖g̃‖² (g̃ = g + wd·x) and ‖x‖². 4 B (8 B with wd).
- ``update_kernel`` (the measurement update): x ← x − c_x·d (d = g̃, or g for KOALA-V's
  ``raw_grad_step``); KOALA-M also u ← s·u − c_u·g̃ and xavg ← xavg + 0.1·(x − xavg). Tensors the
  filter skipped are not touched. KOALA-V 12 B; KOALA-M 28 B.
- ``fold_kernel`` (KOALA-M, opt-in fold mode): the same update, then the next predict's
  elementwise part in registers (x ← x + u) and the partial sums of ‖xavg − x‖² the next
  predict needs; 28 B, and the predict pass disappears.
- ``predict_kernel`` (KOALA-M predict): partial sums of ‖xavg − x‖² (x before the move), then
  x ← x + s_x·u and, unless the velocity is kept deferred (fold mode), u ← a·u. 20 B.

Scalar arguments: the Python floats a pass takes (velocity and position scales, xavg's EMA
weight) are declared ``tl.float64``. Undeclared, compiled Triton would type them fp32 (the
interpreter keeps Python's double), so float64 parameters would step with fp32(0.9); declared,
each program rounds them once to ``CT``, which for float32 and 16-bit parameters is the fp32
value the PyTorch path uses.

Scaled gradients (``UNSCALE``): with a ``GradScaler``, gradients hold S·g; the passes that read
them multiply by 1/S (computed in ``CT`` from the scale at ``p_scale``: exact for the scaler's
powers of two) as they load them, so the gradients themselves are never rewritten.

Tiles: each program first walks the full tiles of its chunk without a mask, then one masked
tail tile (``for PHASE in tl.static_range(2)``). Together with the alignment hints (every
address is 16-byte aligned, which ``tables.prepare`` guarantees by staging any tensor that is not,
and chunk starts are multiples of ``CHUNK``) this lets the compiler emit 128-bit vector loads
and stores; a mask on every tile would not (its bound is loaded from the table, so the
compiler cannot prove whole vectors share it).

Only tensors the filter updated are stepped, and their gradients are finite (the filter skips
the whole measurement otherwise), so no sanitising of non-finite values is needed here: the
PyTorch path's ``nan_to_num`` only matters for its skipped tensors, which the kernels never
touch.
Per-chunk partial sums accumulate in ``CT`` over the chunk (a fixed tree: deterministic) and are
stored as float64; the filter kernel adds the chunks of a tensor in chunk order.
"""

from __future__ import annotations

import triton.language as tl

from .constants import ALIGN, COL_A, COL_G, COL_NUMEL, COL_SLOT, COL_U, COL_X, NCOL, SUM, triton_kernel


@triton_kernel
def norms_kernel(
    p_chunks, p_rows, p_wd, p_partials, p_scale, p_slot_chunks, p_sums, p_arrivals,
    chunk_base,
    DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, UNSCALE: tl.constexpr,
    SUM_C: tl.constexpr,
):
    """Per-chunk ‖g‖², ‖g̃‖², ‖x‖² into ``p_partials[chunk_base + chunk, 0:3]`` (float64), and
    each tensor's sums of them into ``p_sums[slot, 0:3]``.

    ``p_wd`` [k] float64: weight decay by slot; where it is 0 the ‖g̃‖² slot repeats ‖g‖² and
    x is not read. The tensor's sums are finished by the last of its programs to write its
    partial (``p_arrivals`` [k] int32, an arrival count per slot, zero before the launch and
    reset by that program): it adds the tensor's ``p_slot_chunks[slot]`` = (first chunk,
    chunks) partials in chunk order, SUM_C lanes then one reduction tree, so the result does
    not depend on which program was last (deterministic, no float atomics), and the work is
    spread over the tensors instead of one program walking them all.
    """
    i_c = tl.program_id(0).to(tl.int64)
    p_ch = p_chunks + 2 * i_c
    i_row = tl.load(p_ch)
    o_start = tl.multiple_of(tl.load(p_ch + 1), CHUNK)
    p_row = p_rows + i_row * NCOL
    n = tl.load(p_row + COL_NUMEL)
    i_slot = tl.load(p_row + COL_SLOT)
    p_x = tl.multiple_of(tl.load(p_row + COL_X).to(tl.pointer_type(DT)), ALIGN)
    p_g = tl.multiple_of(tl.load(p_row + COL_G).to(tl.pointer_type(DT)), ALIGN)
    b_wd64 = tl.load(p_wd + i_slot)
    b_wd = b_wd64.to(CT)
    decayed = b_wd64 != 0
    if UNSCALE:
        b_inv = 1.0 / tl.load(p_scale).to(CT)

    b_gg = tl.full([BLOCK], 0.0, dtype=CT)
    b_dd = tl.full([BLOCK], 0.0, dtype=CT)
    b_xx = tl.full([BLOCK], 0.0, dtype=CT)
    n_here = tl.minimum(n - o_start, CHUNK)
    n_full = n_here // BLOCK * BLOCK
    o_tile = o_start + tl.arange(0, BLOCK).to(tl.int64)
    for PHASE in tl.static_range(2):  # 0: full tiles, unmasked; 1: the masked tail
        if PHASE == 0:
            i_lo = 0
            i_hi = n_full
        else:
            i_lo = n_full
            i_hi = n_here
        for i in range(i_lo, i_hi, BLOCK):
            o_e = o_tile + i
            p_xe = p_x + o_e
            p_ge = p_g + o_e
            if PHASE == 0:
                m_e = None
                zero = None
            else:
                m_e = o_e < n
                zero = 0.0
            b_g = tl.load(p_ge, mask=m_e, other=zero).to(CT)
            if UNSCALE:
                b_g = b_g * b_inv
            b_gg += b_g * b_g
            if decayed:
                b_x = tl.load(p_xe, mask=m_e, other=zero).to(CT)
                b_d = b_g + b_wd * b_x
                b_dd += b_d * b_d
                b_xx += b_x * b_x
    s_gg = tl.reduce(b_gg, 0, SUM).to(tl.float64)
    s_dd = tl.where(decayed, tl.reduce(b_dd, 0, SUM).to(tl.float64), s_gg)
    s_xx = tl.reduce(b_xx, 0, SUM).to(tl.float64)
    p_out = p_partials + 3 * (chunk_base + i_c)
    tl.store(p_out, s_gg)
    tl.store(p_out + 1, s_dd)
    tl.store(p_out + 2, s_xx)
    # this program's partial is written (by every thread) before it counts as arrived; the
    # atomic's acquire-release order makes the partials of those before it visible to the last
    tl.debug_barrier()
    c_first = tl.load(p_slot_chunks + 2 * i_slot)
    c_count = tl.load(p_slot_chunks + 2 * i_slot + 1)
    arrived = tl.atomic_add(p_arrivals + i_slot, 1, sem="acq_rel")
    if arrived == c_count - 1:
        o_c = tl.arange(0, SUM_C).to(tl.int64)
        a_gg = tl.full([SUM_C], 0.0, dtype=tl.float64)
        a_dd = tl.full([SUM_C], 0.0, dtype=tl.float64)
        a_xx = tl.full([SUM_C], 0.0, dtype=tl.float64)
        for c0 in range(0, c_count, SUM_C):
            m_c = c0 + o_c < c_count
            p_c3 = p_partials + 3 * (c_first + c0 + o_c)
            a_gg += tl.load(p_c3, mask=m_c, other=0.0, cache_modifier=".cg")
            a_dd += tl.load(p_c3 + 1, mask=m_c, other=0.0, cache_modifier=".cg")
            a_xx += tl.load(p_c3 + 2, mask=m_c, other=0.0, cache_modifier=".cg")
        p_s3 = p_sums + 3 * i_slot
        tl.store(p_s3, tl.reduce(a_gg, 0, SUM))
        tl.store(p_s3 + 1, tl.reduce(a_dd, 0, SUM))
        tl.store(p_s3 + 2, tl.reduce(a_xx, 0, SUM))
        tl.store(p_arrivals + i_slot, 0)


@triton_kernel
def update_kernel(
    p_chunks, p_rows, p_wd, p_coef, p_scale,
    chunk_base, u_scale: tl.float64, avg_weight: tl.float64,
    DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    MOMENTUM: tl.constexpr, RAW_STEP: tl.constexpr, UNSCALE: tl.constexpr,
):
    """The measurement update of every row (every row has a slot).

    ``p_coef`` [k, 3] float64 by slot: (c_x, c_u, updated) from the filter kernel; a row the
    filter did not update is not touched. ``u_scale`` multiplies the stored velocity before use
    (1 after a plain predict). ``avg_weight`` is xavg's EMA weight 1 − 0.9.
    """
    i_c = tl.program_id(0).to(tl.int64)
    p_ch = p_chunks + 2 * i_c
    i_row = tl.load(p_ch)
    p_row = p_rows + i_row * NCOL
    i_slot = tl.load(p_row + COL_SLOT)
    b_upd = tl.load(p_coef + 3 * i_slot + 2)
    if b_upd != 0:
        o_start = tl.multiple_of(tl.load(p_ch + 1), CHUNK)
        n = tl.load(p_row + COL_NUMEL)
        b_cx = tl.load(p_coef + 3 * i_slot).to(CT)
        b_wd64 = tl.load(p_wd + i_slot)
        b_wd = b_wd64.to(CT)
        decayed = b_wd64 != 0
        if UNSCALE:
            b_inv = 1.0 / tl.load(p_scale).to(CT)
        p_x = tl.multiple_of(tl.load(p_row + COL_X).to(tl.pointer_type(DT)), ALIGN)
        p_g = tl.multiple_of(tl.load(p_row + COL_G).to(tl.pointer_type(DT)), ALIGN)
        if MOMENTUM:
            b_cu = tl.load(p_coef + 3 * i_slot + 1).to(CT)
            b_u_scale = (tl.full([], 0.0, dtype=tl.float64) + u_scale).to(CT)
            b_avg_weight = (tl.full([], 0.0, dtype=tl.float64) + avg_weight).to(CT)
            p_u = tl.multiple_of(tl.load(p_row + COL_U).to(tl.pointer_type(DT)), ALIGN)
            p_a = tl.multiple_of(tl.load(p_row + COL_A).to(tl.pointer_type(DT)), ALIGN)
        n_here = tl.minimum(n - o_start, CHUNK)
        n_full = n_here // BLOCK * BLOCK
        o_tile = o_start + tl.arange(0, BLOCK).to(tl.int64)
        for PHASE in tl.static_range(2):  # 0: full tiles, unmasked; 1: the masked tail
            if PHASE == 0:
                i_lo = 0
                i_hi = n_full
            else:
                i_lo = n_full
                i_hi = n_here
            for i in range(i_lo, i_hi, BLOCK):
                o_e = o_tile + i
                p_xe = p_x + o_e
                p_ge = p_g + o_e
                if PHASE == 0:
                    m_e = None
                    zero = None
                else:
                    m_e = o_e < n
                    zero = 0.0
                b_x = tl.load(p_xe, mask=m_e, other=zero).to(CT)
                b_g = tl.load(p_ge, mask=m_e, other=zero).to(CT)
                if UNSCALE:
                    b_g = b_g * b_inv
                b_d = tl.where(decayed, b_g + b_wd * b_x, b_g)
                if RAW_STEP:
                    b_dx = b_cx * b_g
                else:
                    b_dx = b_cx * b_d
                b_x1 = (b_x - b_dx).to(DT)
                tl.store(p_xe, b_x1, mask=m_e)
                if MOMENTUM:
                    p_ue = p_u + o_e
                    p_ae = p_a + o_e
                    b_u = tl.load(p_ue, mask=m_e, other=zero).to(CT) * b_u_scale
                    b_du = b_cu * b_d
                    tl.store(p_ue, (b_u - b_du).to(DT), mask=m_e)
                    b_a = tl.load(p_ae, mask=m_e, other=zero).to(CT)
                    b_a1 = b_a + b_avg_weight * (b_x1.to(CT) - b_a)
                    tl.store(p_ae, b_a1.to(DT), mask=m_e)


@triton_kernel
def fold_kernel(
    p_chunks, p_rows, p_wd, p_coef, p_dist, p_pending, p_scale,
    chunk_base, u_scale: tl.float64, avg_weight: tl.float64,
    DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, UNSCALE: tl.constexpr,
):
    """KOALA-M fold mode: the measurement update, then the next predict's elementwise part.

    Rows are *all* parameters; slot -1 marks one without a gradient this step (not measured,
    still moved). The velocity buffer holds the deferred u⁺: the predicted velocity is
    ``u_scale``·u (a^j after j predicts). Per element, in registers:
    û = s·u; x⁺ = x − c_x·g̃; u⁺ = û − c_u·g̃; xavg⁺ = xavg + 0.1·(x⁺ − xavg) (updated rows only);
    partial ‖xavg⁺ − x⁺‖² for the next D; then x ← x⁺ + u⁺ and u ← u⁺ (the next prediction,
    velocity kept deferred). The posterior values are rounded to the parameter dtype before
    the predict uses them, as the unfolded path stores and reloads them. Raises ``pending``.
    Rows that are not updated read no gradient and write no xavg.
    """
    i_c = tl.program_id(0).to(tl.int64)
    p_ch = p_chunks + 2 * i_c
    i_row = tl.load(p_ch)
    o_start = tl.multiple_of(tl.load(p_ch + 1), CHUNK)
    p_row = p_rows + i_row * NCOL
    n = tl.load(p_row + COL_NUMEL)
    i_slot = tl.load(p_row + COL_SLOT)
    has_slot = i_slot >= 0
    i_s = tl.maximum(i_slot, 0)
    b_upd = tl.load(p_coef + 3 * i_s + 2, mask=has_slot, other=0.0)
    b_cx = tl.load(p_coef + 3 * i_s, mask=has_slot, other=0.0).to(CT)
    b_cu = tl.load(p_coef + 3 * i_s + 1, mask=has_slot, other=0.0).to(CT)
    b_wd64 = tl.load(p_wd + i_s, mask=has_slot, other=0.0)
    b_wd = b_wd64.to(CT)
    decayed = b_wd64 != 0
    updated = b_upd != 0
    b_u_scale = (tl.full([], 0.0, dtype=tl.float64) + u_scale).to(CT)
    b_avg_weight = (tl.full([], 0.0, dtype=tl.float64) + avg_weight).to(CT)
    if UNSCALE:
        b_inv = 1.0 / tl.load(p_scale).to(CT)
    p_x = tl.multiple_of(tl.load(p_row + COL_X).to(tl.pointer_type(DT)), ALIGN)
    p_g = tl.multiple_of(tl.load(p_row + COL_G).to(tl.pointer_type(DT)), ALIGN)
    p_u = tl.multiple_of(tl.load(p_row + COL_U).to(tl.pointer_type(DT)), ALIGN)
    p_a = tl.multiple_of(tl.load(p_row + COL_A).to(tl.pointer_type(DT)), ALIGN)
    n_here = tl.minimum(n - o_start, CHUNK)
    n_full = n_here // BLOCK * BLOCK
    o_tile = o_start + tl.arange(0, BLOCK).to(tl.int64)
    b_dist = tl.full([BLOCK], 0.0, dtype=CT)
    for PHASE in tl.static_range(2):  # 0: full tiles, unmasked; 1: the masked tail
        if PHASE == 0:
            i_lo = 0
            i_hi = n_full
        else:
            i_lo = n_full
            i_hi = n_here
        for i in range(i_lo, i_hi, BLOCK):
            o_e = o_tile + i
            p_xe = p_x + o_e
            p_ge = p_g + o_e
            p_ue = p_u + o_e
            p_ae = p_a + o_e
            if PHASE == 0:
                m_e = None
                zero = None
            else:
                m_e = o_e < n
                zero = 0.0
            b_x = tl.load(p_xe, mask=m_e, other=zero).to(CT)
            b_u = tl.load(p_ue, mask=m_e, other=zero).to(CT) * b_u_scale
            b_a = tl.load(p_ae, mask=m_e, other=zero).to(CT)
            if updated:
                b_g = tl.load(p_ge, mask=m_e, other=zero).to(CT)
                if UNSCALE:
                    b_g = b_g * b_inv
                b_d = tl.where(decayed, b_g + b_wd * b_x, b_g)
                b_dx = b_cx * b_d
                b_du = b_cu * b_d
                b_x1 = (b_x - b_dx).to(DT).to(CT)
                b_u1 = (b_u - b_du).to(DT).to(CT)
                b_a1 = (b_a + b_avg_weight * (b_x1 - b_a)).to(DT).to(CT)
                tl.store(p_ae, b_a1.to(DT), mask=m_e)
            else:
                b_x1 = b_x
                b_u1 = b_u.to(DT).to(CT)
                b_a1 = b_a
            b_gap = b_a1 - b_x1
            b_dist += b_gap * b_gap
            tl.store(p_xe, (b_x1 + b_u1).to(DT), mask=m_e)
            tl.store(p_ue, b_u1.to(DT), mask=m_e)
    tl.store(p_dist + chunk_base + i_c, tl.reduce(b_dist, 0, SUM).to(tl.float64))
    if i_c == 0:
        tl.store(p_pending, 1)


@triton_kernel
def predict_kernel(
    p_chunks, p_rows, p_dist, p_pending,
    chunk_base, x_scale: tl.float64, u_mult: tl.float64,
    DT: tl.constexpr, CT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    SCALE_U: tl.constexpr,
):
    """KOALA-M predict's elementwise part over every parameter.

    Writes the per-chunk partial sums of ‖xavg − x‖² (x before the move) into ``p_dist`` and
    raises the filter's ``pending`` flag (the scalar part runs in the next filter kernel); then
    x ← x + x_scale·u and, with ``SCALE_U``, u ← u_mult·u.
    """
    i_c = tl.program_id(0).to(tl.int64)
    p_ch = p_chunks + 2 * i_c
    i_row = tl.load(p_ch)
    o_start = tl.multiple_of(tl.load(p_ch + 1), CHUNK)
    p_row = p_rows + i_row * NCOL
    n = tl.load(p_row + COL_NUMEL)
    p_x = tl.multiple_of(tl.load(p_row + COL_X).to(tl.pointer_type(DT)), ALIGN)
    p_u = tl.multiple_of(tl.load(p_row + COL_U).to(tl.pointer_type(DT)), ALIGN)
    p_a = tl.multiple_of(tl.load(p_row + COL_A).to(tl.pointer_type(DT)), ALIGN)
    b_dist = tl.full([BLOCK], 0.0, dtype=CT)
    b_x_scale = (tl.full([], 0.0, dtype=tl.float64) + x_scale).to(CT)
    b_u_mult = (tl.full([], 0.0, dtype=tl.float64) + u_mult).to(CT)
    n_here = tl.minimum(n - o_start, CHUNK)
    n_full = n_here // BLOCK * BLOCK
    o_tile = o_start + tl.arange(0, BLOCK).to(tl.int64)
    for PHASE in tl.static_range(2):  # 0: full tiles, unmasked; 1: the masked tail
        if PHASE == 0:
            i_lo = 0
            i_hi = n_full
        else:
            i_lo = n_full
            i_hi = n_here
        for i in range(i_lo, i_hi, BLOCK):
            o_e = o_tile + i
            p_xe = p_x + o_e
            p_ue = p_u + o_e
            p_ae = p_a + o_e
            if PHASE == 0:
                m_e = None
                zero = None
            else:
                m_e = o_e < n
                zero = 0.0
            b_x = tl.load(p_xe, mask=m_e, other=zero).to(CT)
            b_u = tl.load(p_ue, mask=m_e, other=zero).to(CT)
            b_a = tl.load(p_ae, mask=m_e, other=zero).to(CT)
            b_gap = b_a - b_x
            b_dist += b_gap * b_gap
            tl.store(p_xe, (b_x + b_x_scale * b_u).to(DT), mask=m_e)
            if SCALE_U:
                tl.store(p_ue, (b_u_mult * b_u).to(DT), mask=m_e)
    tl.store(p_dist + chunk_base + i_c, tl.reduce(b_dist, 0, SUM).to(tl.float64))
    if i_c == 0:
        tl.store(p_pending, 1)
