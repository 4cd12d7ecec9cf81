r"""The scalar Kalman filter on the device: one program, float64 throughout.

``filter_kernel`` evaluates exactly what ``koala_triton._kalman`` evaluates with torch ops (the
same float64 expressions in the same order), from the per-tensor sums the norms pass finished
and the per-chunk distance partials of the predict (or fold) pass:

1. *Pending predict tail* (KOALA-M, ``TAIL``): if the predict pass (or a folded update) raised
   the ``pending`` flag, D = sqrt(Σ partial ‖xavg − x‖²)/n, qx ← 0.9·qx + 0.1·D and
   P̂ = F P Fᵀ + diag(qx, qv); the flag is cleared. The flag lives on the device, so a graph
   replay or a repeated settle applies each predict exactly once.
2. *Measurement* (``MEASURE``): the loss moments; BLOCK_T tensors' sums per step (one step
   up to BLOCK_T tensors, so the serial work does not grow with the tensor count below that);
   finiteness of the loss, its second moment and every gradient norm; the R
   EMA (updated before use); the skip rule sqrt(‖g‖²) >= eps; gains c_x = lr·L̃·P̂xx/S,
   c_u = lr·L̃·P̂ux/S; G = the largest ‖g̃‖² among updated tensors; the stable covariance forms
   p⁺ = ρ·p̂ (or Pxx⁺ = ρ·P̂xx, Pxu⁺ = ρ·P̂xu, Puu⁺ = (G·det P̂ + R·P̂uu)/S), ρ = R/S; R, step and
   skipped_steps are written back.

``p_const`` is a float64 device vector of the hyper-parameters (Python floats passed as kernel
arguments would be rounded to float32): [alpha_r, 1 − alpha_r, a, a·a, qv, 0.9, 1 − 0.9, f, 2f,
f², σ, Q]; for KOALA-V the qv slot holds q; σ and Q are KOALA++'s.

KOALA++ (``PLUSPLUS``): no global covariance; partials and sums have 5 columns (‖g‖², ‖g̃‖²,
‖x‖², g̃·h, g̃·v), and per tensor the filter evaluates ``koala_triton._kalman_pp.measure_pp``
(the same float64 expressions in the same order) from the tensor's stored row of
``p_tensors`` [n, 4] (S, ‖h‖², h·v, updates; row ``p_index[slot]``), writes the gains
[k, 6] (a, b, c, step, Q, updated) and the new rows.

The loss arrives as given (``LOSS_VEC``: the per-sample vector [n_loss], stride
``loss_stride``, any float dtype, reduced here to its float64 mean and mean of squares; else
the 0-dim loss and loss_var), so no torch op turns it into moments before the launch. The
loss floor f (const slots 7–9: f, 2f, f²) is subtracted first (mean and second moment of
l − f), and ``p_below`` counts the finite steps whose mean loss was below it. ``FOUND_INF``:
a ``GradScaler``'s inf flag at ``p_found_inf`` skips the measurement like a non-finite input. KOALA-V
(``MOMENTUM`` false, ``V_PREDICT``) first adds q ``v_predicts`` times to p: the predicts
counted on the host.
"""

from __future__ import annotations

import triton.language as tl

from .constants import MAX, SUM, constant, triton_kernel

C_ALPHA = constant(0)
C_ONE_MINUS_ALPHA = constant(1)
C_A = constant(2)
C_A2 = constant(3)
C_QV = constant(4)
C_BETA = constant(5)
C_ONE_MINUS_BETA = constant(6)
C_FLOOR = constant(7)
C_TWO_FLOOR = constant(8)
C_FLOOR_SQ = constant(9)
C_SIGMA = constant(10)
C_Q = constant(11)


@triton_kernel
def filter_kernel(
    p_pxx, p_pxu, p_puu, p_qx, p_r, p_step, p_skipped, p_below, p_found_inf,
    p_loss, p_loss_sq, p_lr, p_wd, p_eps, p_slot_chunks, p_sums, p_coef,
    p_pending, p_dist, p_const, p_tensors, p_index,
    n_slots, n_dist, numel_total, n_loss, loss_stride, v_predicts,
    MOMENTUM: tl.constexpr, ADAPTIVE: tl.constexpr, MEASURE: tl.constexpr, TAIL: tl.constexpr,
    LOSS_VEC: tl.constexpr, V_PREDICT: tl.constexpr, FOUND_INF: tl.constexpr,
    PLUSPLUS: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One program. For KOALA-V, ``p_pxx`` is p and the KOALA-M-only pointers are unused.

    ``p_sums`` [k, 3] float64 ([k, 5] for KOALA++): each tensor's ‖g‖², ‖g̃‖², ‖x‖² (and g̃·h,
    g̃·v), finished by the norms pass (``passes.norms_kernel``); ``p_slot_chunks`` [k, 2] says
    which tensors have chunks (and so sums). ``p_coef`` out: the per-tensor gains.
    """
    if PLUSPLUS:
        NPART: tl.constexpr = 5
    else:
        NPART: tl.constexpr = 3
    o_t = tl.arange(0, BLOCK_T)
    o_f = tl.arange(0, BLOCK_F)  # flat sweeps (loss vector, distance partials)
    zero = tl.full([], 0.0, dtype=tl.float64)
    b_pxx = tl.load(p_pxx)
    if MOMENTUM:
        b_pxu = tl.load(p_pxu)
        b_puu = tl.load(p_puu)
    else:
        b_pxu = zero
        b_puu = zero
        # 0. KOALA-V's predicts counted on the host since the last update: p̂ = p + q (+ q …),
        # one rounding per predict, as the PyTorch path's p.add_(q) per predict.
        if V_PREDICT:  # v_predicts > 0
            b_q = tl.load(p_const + C_QV)
            for _ in range(0, v_predicts):
                b_pxx = b_pxx + b_q

    # ---------------------------------------------------------------- 1. pending predict
    if TAIL:
        pending = tl.load(p_pending) != 0
        b_qx = tl.load(p_qx)
        b_acc = tl.full([BLOCK_F], 0.0, dtype=tl.float64)
        for i in range(0, n_dist, BLOCK_F):
            b_acc += tl.load(p_dist + i + o_f, mask=i + o_f < n_dist, other=0.0)
        dist = tl.sqrt(tl.reduce(b_acc, 0, SUM)) / (zero + numel_total)
        beta = tl.load(p_const + C_BETA)
        one_minus_beta = tl.load(p_const + C_ONE_MINUS_BETA)
        a = tl.load(p_const + C_A)
        qx_new = b_qx * beta + one_minus_beta * dist
        pxx_new = b_pxx + 2.0 * b_pxu + b_puu + qx_new
        pxu_new = a * (b_pxu + b_puu)
        puu_new = tl.load(p_const + C_A2) * b_puu + tl.load(p_const + C_QV)
        b_qx = tl.where(pending, qx_new, b_qx)
        b_pxx = tl.where(pending, pxx_new, b_pxx)
        b_pxu = tl.where(pending, pxu_new, b_pxu)
        b_puu = tl.where(pending, puu_new, b_puu)
        tl.store(p_qx, b_qx)
        tl.store(p_pending, 0)

    # ---------------------------------------------------------------- 2. measurement
    if MEASURE:
        b_r = tl.load(p_r)
        if LOSS_VEC:
            # per-sample losses (any float dtype): mean and mean of squares in float64, a fixed
            # order (lanes, then one reduction tree)
            floor = tl.load(p_const + C_FLOOR)
            b_l1 = tl.full([BLOCK_F], 0.0, dtype=tl.float64)
            b_l2 = tl.full([BLOCK_F], 0.0, dtype=tl.float64)
            for i in range(0, n_loss, BLOCK_F):
                o = i + o_f
                m_l = o < n_loss
                b_l = tl.load(p_loss + o * loss_stride, mask=m_l, other=0.0).to(tl.float64)
                b_l = tl.where(m_l, b_l - floor, 0.0)  # the loss above its floor
                b_l1 += b_l
                b_l2 += b_l * b_l
            n_l = zero + n_loss  # (not n_loss.to: an int argument equal to 1 may arrive as a constexpr)
            loss = tl.reduce(b_l1, 0, SUM) / n_l
            loss_sq = tl.reduce(b_l2, 0, SUM) / n_l
        else:
            raw = tl.load(p_loss).to(tl.float64)
            loss = raw - tl.load(p_const + C_FLOOR)
            if ADAPTIVE:  # mean of (l − floor)² from the mean of l² and the mean of l
                loss_sq = (tl.load(p_loss_sq).to(tl.float64) - raw * tl.load(p_const + C_TWO_FLOOR)) \
                    + tl.load(p_const + C_FLOOR_SQ)
        # Each tensor's sums (‖g‖², ‖g̃‖², ‖x‖²) were finished by the norms pass (the last of
        # its programs adds its chunk partials); a tensor without chunks (no elements) has none
        # written: its sums are 0. BLOCK_T tensors per step: one step up to BLOCK_T tensors.
        # Every gradient norm finite <=> the sum of all of them is (they are >= 0).
        total = zero
        for t0 in range(0, n_slots, BLOCK_T):
            o_s = t0 + o_t
            m_s = (o_s < n_slots) & (tl.load(p_slot_chunks + 2 * o_s + 1, mask=o_s < n_slots, other=0) > 0)
            p_sn = p_sums + NPART * o_s
            total += tl.reduce(tl.load(p_sn, mask=m_s, other=0.0) + tl.load(p_sn + 1, mask=m_s, other=0.0), 0, SUM)
        finite = (tl.abs(loss) < float("inf")) & (total < float("inf"))
        if ADAPTIVE:
            finite = finite & (tl.abs(loss_sq) < float("inf"))
        if FOUND_INF:  # a GradScaler found inf/NaN in the scaled gradients: skip, as for NaN
            finite = finite & (tl.load(p_found_inf).to(tl.float32) == 0)
        # the same condition as a block mask (Triton's interpreter mistypes scalar-bool & block)
        m_finite = (tl.full([BLOCK_T], 0.0, dtype=tl.float64) + tl.where(finite, 0.0, 1.0)) == 0
        if ADAPTIVE:
            ema = tl.load(p_const + C_ALPHA) * b_r + tl.load(p_const + C_ONE_MINUS_ALPHA) * loss_sq
            noise = tl.where(finite, ema, b_r)
        else:
            noise = b_r

        largest = zero
        if PLUSPLUS:
            sigma = tl.load(p_const + C_SIGMA)
            q = tl.load(p_const + C_Q)
        for t0 in range(0, n_slots, BLOCK_T):
            o_s = t0 + o_t
            m_s = o_s < n_slots
            m_w = m_s & (tl.load(p_slot_chunks + 2 * o_s + 1, mask=m_s, other=0) > 0)  # sums written
            p_sn = p_sums + NPART * o_s
            b_gg = tl.load(p_sn, mask=m_w, other=0.0)
            b_dd = tl.load(p_sn + 1, mask=m_w, other=0.0)
            b_xx = tl.load(p_sn + 2, mask=m_w, other=0.0)
            b_eps = tl.load(p_eps + o_s, mask=m_s, other=0.0)
            b_lr = tl.load(p_lr + o_s, mask=m_s, other=0.0)
            b_wd = tl.load(p_wd + o_s, mask=m_s, other=0.0)
            ok = (tl.sqrt(b_gg) >= b_eps) & m_finite & m_s
            reg_loss = loss + 0.5 * b_wd * tl.where(b_wd != 0, b_xx, 0.0)
            if PLUSPLUS:  # _kalman_pp.measure_pp, expression for expression
                p_r4 = p_tensors + 4 * tl.load(p_index + o_s, mask=m_s, other=0)
                r_S = tl.load(p_r4, mask=m_s, other=0.0)
                r_hh = tl.load(p_r4 + 1, mask=m_s, other=0.0)
                r_hv = tl.load(p_r4 + 2, mask=m_s, other=0.0)
                r_up = tl.load(p_r4 + 3, mask=m_s, other=0.0)
                HH = tl.where(ok, b_dd, 1.0)
                first = r_up == 0
                sHH = sigma * HH
                hh = tl.where(first, HH, r_hh)
                Hh = tl.where(first, HH, tl.load(p_sn + 3, mask=m_w, other=0.0))
                Hv = tl.where(first, sHH, tl.load(p_sn + 4, mask=m_w, other=0.0))
                hv = tl.where(first, sHH, r_hv)
                S0 = tl.where(first, (sHH + q * HH) + noise, r_S)
                hh = tl.where(ok, hh, 1.0)
                S0 = tl.where(ok, S0, 1.0)
                Hh = tl.where(ok, Hh, 0.0)
                Hv = tl.where(ok, Hv, 0.0)
                hv = tl.where(ok, hv, 0.0)
                lam = (Hv + q * Hh) / S0
                alpha = Hh / hh
                ca = alpha - lam
                cc = -q * lam
                if SYMMETRIC:
                    cc = (Hv / hh - (Hh * hv) / (hh * hh)) + cc
                vH = (ca * Hv + q * HH) + cc * Hh
                S = (vH + q * HH) + noise
                step = b_lr * tl.where(ok, reg_loss, 0.0) / S  # a skipped lane's loss may be NaN
                cb = tl.where(first, (ca * sigma + q) + cc, q)
                ca = tl.where(first, 0.0, ca)
                cc = tl.where(first, 0.0, cc)
                p_c = p_coef + 6 * o_s
                tl.store(p_c, tl.where(ok, ca, 1.0), mask=m_s)
                tl.store(p_c + 1, tl.where(ok, cb, 0.0), mask=m_s)
                tl.store(p_c + 2, tl.where(ok, cc, 0.0), mask=m_s)
                tl.store(p_c + 3, tl.where(ok, step, 0.0), mask=m_s)
                tl.store(p_c + 4, zero + q, mask=m_s)
                tl.store(p_c + 5, ok.to(tl.float64), mask=m_s)
                tl.store(p_r4, tl.where(ok, S, r_S), mask=m_s)
                tl.store(p_r4 + 1, tl.where(ok, HH, r_hh), mask=m_s)
                tl.store(p_r4 + 2, tl.where(ok, vH, r_hv), mask=m_s)
                tl.store(p_r4 + 3, tl.where(ok, r_up + 1.0, r_up), mask=m_s)
            else:  # KOALA's gains and the largest ‖g̃‖² of the updated tensors
                g_sq = tl.where(ok, b_dd, 0.0)
                reg_loss = tl.where(ok, reg_loss, 0.0)
                scale = b_lr * reg_loss / tl.where(ok, b_pxx * g_sq + noise, 1.0)
                p_c = p_coef + 3 * o_s
                tl.store(p_c, scale * b_pxx, mask=m_s)
                tl.store(p_c + 1, scale * b_pxu, mask=m_s)
                tl.store(p_c + 2, ok.to(tl.float64), mask=m_s)
                largest = tl.maximum(largest, tl.reduce(g_sq, 0, MAX))

        s_max = b_pxx * largest + noise
        informative = s_max > 0
        s_max = tl.where(informative, s_max, 1.0)
        rho = tl.where(informative, noise / s_max, 1.0)
        if MOMENTUM and not PLUSPLUS:
            det = b_pxx * b_puu - b_pxu * b_pxu
            # nothing measured (G = 0) leaves P̂uu bit for bit (R·P̂uu/R can round), as _kalman does
            measured = informative & (largest > 0)
            b_puu = tl.where(measured, (largest * det + noise * b_puu) / s_max, b_puu)
            b_pxu = b_pxu * rho
        b_pxx = b_pxx * rho
        tl.store(p_r, noise)
        tl.store(p_step, tl.load(p_step) + 1)
        tl.store(p_skipped, tl.load(p_skipped) + tl.where(finite, 0, 1).to(tl.int64))
        tl.store(p_below, tl.load(p_below) + tl.where(finite & (loss < 0), 1, 0).to(tl.int64))

    if not PLUSPLUS:  # KOALA++ has no global covariance (p_pxx.. are stand-ins)
        tl.store(p_pxx, b_pxx)
        if MOMENTUM:
            tl.store(p_pxu, b_pxu)
            tl.store(p_puu, b_puu)
