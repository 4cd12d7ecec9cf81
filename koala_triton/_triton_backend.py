"""The Triton backend: KOALA's passes as multi-tensor kernels (``koala_triton/kernels``).

Implements the ``_backend.Backend`` interface, fold mode included; the PyTorch backend is the
reference it is tested against. Design, bytes and launch counts: ``kernels/NOTES.md``.

Launches per iteration, independent of the number of tensors (one more norms and one more
update launch per extra parameter dtype), and no other device work: KOALA-V update 3 (norms,
filter, update) and predict 0 (deferred: the filter kernel adds q once per predict); KOALA-M
predict 1 + update 3; KOALA-M with the fold, update 3 and predict 0; KOALA++ update 3 and
predict 0 (it has none). The loss moments are taken inside the filter kernel. Nothing here
reads a device value on the host. (With DTensor parameters on several ranks, a few torch ops
and one all-reduce join the update and KOALA-M's predict: ``_measure``, ``_predict_tail``,
``kernels/NOTES.md``.)

Deferred scalar work (counted in ``PredictState.deferred``):

- KOALA-V's predict p̂ = p + q is applied by the next filter kernel (``V_PREDICT``, q once
  per deferred predict).
- KOALA-M's predict pass (or a folded update) writes per-chunk partial sums of ‖xavg − x‖² and
  raises a device flag; the scalar part of the predict (qx EMA, P̂ = F P Fᵀ + Q), its *tail*,
  runs at the start of the next filter kernel, which clears the flag.

``settle`` applies both before anyone reads ``filter_state`` or ``state_dict()``, so what users
see is the same as on the PyTorch path; for KOALA-M that is one small launch per read, since
only the device flag knows whether a CUDA-graph replay raised it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _kalman
from ._kalman import ISOTROPIC, MOMENTUM
from ._loss import LossInput
from ._plan import StepPlan
from ._predict_state import PredictState
from .kernels import shards, tables
from .kernels.kalman import filter_kernel
from .kernels.launch import blocks_for, launch
from .kernels.passes import fold_kernel, norms_kernel, predict_kernel, update_kernel

import triton.language as tl

FLOAT = _kalman.FLOAT

_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


@dataclass
class PredictTail:
    """KOALA-M's deferred scalar predict: where its distance partials are and its constants.

    Attributes:
        dist: [c] float64 per-chunk partial sums of ‖xavg − x‖² (c = ``n_dist`` chunks).
        numel: elements of all parameters (n of D = ‖xavg − x‖₂ / n).
    """

    dist: Tensor
    n_dist: int
    numel: int
    a: float
    qv: float


@dataclass
class TritonState:
    """The Triton backend's state (owned by one optimizer; never checkpointed).

    Attributes:
        predict: the optimizer's shared ``PredictState``.
        device: where the parameters live.
        tables: the cached pointer/chunk tables and staging buffers (``kernels/tables.py``).
        buffers: grow-only float64 scratch by name: per-chunk ``partials`` [c, 3], gains
            ``coef`` [k, 3], per-tensor ``sums`` [k, 3], distance partials ``dist`` [c].
        constants: hyper-parameter vectors by value (``_const``), with their pinned host copies.
        pending: [1] int32 device flag: a KOALA-M predict tail is pending.
        arrivals: [k] int32 per-tensor arrival counts of the norms pass (zero between launches).
        no_slots: [2] int64 stand-in slot table for a filter launch that measures no tensor.
        tail: KOALA-M's predict tail, once a predict pass has run.
        v_q: KOALA-V's q, for the deferred predicts.
    """

    predict: PredictState
    device: torch.device
    tables: tables.TableCache = field(default_factory=tables.TableCache)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    constants: dict[tuple, Tensor] = field(default_factory=dict)
    pending: Tensor | None = None
    arrivals: Tensor | None = None
    no_slots: Tensor | None = None
    tail: PredictTail | None = None
    v_q: float = 0.0


def _types(dtype: torch.dtype):
    """(element type, compute type): float64 computes in float64, everything else in float32."""
    try:
        dt = _TL_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"fused=True supports float32, bfloat16, float16 and float64 parameters, got {dtype}") from None
    return dt, (tl.float64 if dtype == torch.float64 else tl.float32)


def _launch_groups(table: tables.Table):
    """(group, element type, compute type) for each dtype group of ``table`` with chunks: one
    launch of a pass each."""
    for group in table.groups:
        if group.n_chunks:
            yield (group, *_types(group.dtype))


def _buffer(state: TritonState, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A grow-only scratch buffer owned by ``state`` (stable address while large enough)."""
    buf = state.buffers.get(name)
    if buf is None or buf.numel() < max(numel, 1) or buf.device != device:
        buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        state.buffers[name] = buf
    return buf


def _const(state: TritonState, device: torch.device, *, alpha_r: float, a: float, qv: float,
           floor: float = 0.0, sigma: float = 0.0, q: float = 0.0) -> Tensor:
    """[12] float64 hyper-parameter vector (layout: ``kernels/kalman.py``), uploaded once per
    value set."""
    key = ("const", alpha_r, a, qv, floor, sigma, q)
    vec = state.constants.get(key)
    if vec is None:
        beta = _kalman.QX_BETA
        host = torch.tensor([alpha_r, 1.0 - alpha_r, a, a * a, qv, beta, 1.0 - beta,
                             floor, 2.0 * floor, floor * floor, sigma, q], dtype=FLOAT)
        if device.type == "cuda":
            host = host.pin_memory()
            state.constants[("const_host",) + key[1:]] = host  # source of an asynchronous copy: keep it
        vec = host.to(device, non_blocking=True)
        state.constants[key] = vec
    return vec


def _pending(state: TritonState, device: torch.device) -> Tensor:
    if state.pending is None:
        state.pending = torch.zeros(1, dtype=torch.int32, device=device)
    return state.pending


def _arrivals(state: TritonState, k: int, device: torch.device) -> Tensor:
    """The norms pass's per-tensor arrival counts: zero, and left zero by every launch (the last
    program of a tensor resets its count), so a buffer is zeroed only when it is made."""
    if state.arrivals is None or state.arrivals.numel() < max(k, 1) or state.arrivals.device != device:
        state.arrivals = torch.zeros(max(k, 1), dtype=torch.int32, device=device)
    return state.arrivals


def _no_slots(state: TritonState, device: torch.device) -> Tensor:
    """An int64 stand-in for the slot-chunk table when no tensor is measured (never read, but
    typed as the real one: a float stand-in would make the kernel's loop bound a float)."""
    if state.no_slots is None:
        state.no_slots = torch.zeros(2, dtype=torch.int64, device=device)
    return state.no_slots


@dataclass
class PlusPlusArgs:
    """KOALA++'s part of a measurement: the per-tensor filters and settings.

    Attributes:
        tensors: [n, 4] float64, every tensor's filter row (``_kalman_pp``).
        index: [k] int64, the row of each of the step's tensors.
    """

    tensors: Tensor
    index: Tensor
    sigma: float
    q: float
    symmetric: bool

    @staticmethod
    def columns(pp: PlusPlusArgs | None) -> tuple[int, int]:
        """(partial sums per chunk and tensor, gains per tensor): (3, 3) for KOALA, (5, 6) here."""
        return (3, 3) if pp is None else (5, 6)


def _filter_args(filt: dict[str, Tensor], covariance, pp: PlusPlusArgs | None) -> dict:
    if pp is not None:  # KOALA++: no global covariance (stand-ins, never written)
        r = filt["R"]
        return dict(p_pxx=r, p_pxu=r, p_puu=r, p_qx=r)
    if covariance.velocity:
        return dict(p_pxx=filt["Pxx"], p_pxu=filt["Pxu"], p_puu=filt["Puu"], p_qx=filt["qx"])
    p = filt["p"]
    return dict(p_pxx=p, p_pxu=p, p_puu=p, p_qx=p)


def _loss_args(loss: LossInput) -> dict:
    """Kernel arguments for the loss: the per-sample vector, or the scalar loss and loss_var,
    in any float dtype (the filter kernel takes the moments in float64)."""
    vec, var = loss.loss, loss.loss_var
    per_sample = loss.per_sample
    return dict(
        p_loss=vec, p_loss_sq=var if var is not None else vec,
        n_loss=vec.numel() if per_sample else 1, loss_stride=vec.stride(0) if per_sample else 1,
        LOSS_VEC=per_sample,
    )


def _launch_filter(filt, state: TritonState, device, covariance, *, plan=None, slot_chunks=None, sums=None,
                   coef=None, loss: LossInput | None = None, r=None, alpha_r=0.9,
                   pp: PlusPlusArgs | None = None) -> None:
    """The filter kernel: the deferred predict work, then (with ``loss``) the measurement of
    the per-tensor ``sums`` [k, 3] ([k, 5] for KOALA++, with ``pp``; a slot's sums count where
    ``slot_chunks`` [k, 2] gives it chunks)."""
    measure = loss is not None
    tail = state.tail if covariance.velocity else None
    deferred = state.predict.take_deferred()
    if covariance.velocity:
        a, qv = (tail.a, tail.qv) if tail is not None else (0.0, 0.0)
        v_predicts = 0
    else:  # KOALA-V: p̂ = p + q + … + q, once per deferred predict
        a, qv = 0.0, state.v_q
        v_predicts = deferred
    const = _const(state, device, alpha_r=alpha_r, a=a, qv=qv, floor=loss.floor if measure else 0.0,
                   sigma=pp.sigma if pp else 0.0, q=pp.q if pp else 0.0)
    n_part, _ = PlusPlusArgs.columns(pp)
    pending = _pending(state, device)
    dummy = filt["R"]
    found_inf = plan.found_inf if measure else None
    blocks = blocks_for(device)
    k = len(plan.params) if measure else 0
    loss_args = _loss_args(loss) if measure else dict(
        p_loss=dummy, p_loss_sq=dummy, n_loss=1, loss_stride=1, LOSS_VEC=False)
    launch(
        filter_kernel, (1,), device,
        **_filter_args(filt, covariance, pp),
        p_r=filt["R"], p_step=filt["step"], p_skipped=filt["skipped_steps"],
        p_below=filt["below_floor_steps"], p_found_inf=found_inf if found_inf is not None else dummy,
        **loss_args,
        p_lr=plan.lr if k else dummy, p_wd=plan.weight_decay if k else dummy, p_eps=plan.eps if k else dummy,
        p_slot_chunks=slot_chunks if k else _no_slots(state, device),
        p_sums=sums if k else dummy,
        p_coef=coef if measure else dummy,
        p_pending=pending,
        p_dist=tail.dist if tail is not None else dummy,
        p_const=const,
        p_tensors=pp.tensors if pp else dummy,
        p_index=pp.index if pp and k else _no_slots(state, device),
        n_slots=k,
        n_dist=tail.n_dist if tail is not None else 0,
        numel_total=max(tail.numel, 1) if tail is not None else 1,
        v_predicts=v_predicts,
        MOMENTUM=covariance.velocity, ADAPTIVE=measure and r is None, MEASURE=measure,
        TAIL=tail is not None, V_PREDICT=v_predicts > 0, FOUND_INF=found_inf is not None,
        PLUSPLUS=pp is not None, SYMMETRIC=bool(pp and pp.symmetric),
        BLOCK_T=blocks.block_t, BLOCK_F=blocks.block_f,
    )


def _measure(plan: StepPlan, table: tables.Table, filt, state: TritonState, device, covariance, *,
             loss: LossInput, r, alpha_r, pp: PlusPlusArgs | None = None) -> Tensor:
    """Norms pass (one launch per dtype group) and the filter kernel; returns the gains [k, 3]
    ([k, 6] for KOALA++).

    With DTensor shards on several ranks (``plan.collective``), each tensor's partials are
    summed here (``shards.row_sums``) and reduced over the ranks, with the loss, before the
    filter kernel reads them."""
    blocks = blocks_for(device)
    k = len(plan.params)
    n_part, n_coef = PlusPlusArgs.columns(pp)
    partials = _buffer(state, "partials", n_part * table.n_chunks, FLOAT, device)
    sums = _buffer(state, "sums", n_part * k, FLOAT, device)
    coef = _buffer(state, "coef", n_coef * k, FLOAT, device)
    arrivals = _arrivals(state, k, device)
    for group, dt, ct in _launch_groups(table):
        launch(
            norms_kernel, (group.n_chunks,), device,
            p_chunks=group.chunks, p_rows=group.rows, p_wd=plan.weight_decay, p_partials=partials,
            **_scale_args(plan, partials), p_slot_chunks=table.slot_chunks, p_sums=sums, p_arrivals=arrivals,
            chunk_base=group.chunk_base,
            DT=dt, CT=ct, CHUNK=blocks.chunk, **_norms_geometry(blocks, group.dtype, pp), PLUSPLUS=pp is not None,
            SUM_C=blocks.sum_c,
        )
    slot_chunks = table.slot_chunks
    if plan.collective is not None:
        # each rank's sums cover its shards only: add them over the ranks (a slot without local
        # chunks has no finished sums here, so they are taken from the partials), and let every
        # slot count (one chunk each) in the filter kernel
        loss, sums = plan.collective.reduce(loss, shards.row_sums(table, partials, n_part))
        slot_chunks = shards.one_chunk_per_slot(table, k, device)
    _launch_filter(filt, state, device, covariance, plan=plan, slot_chunks=slot_chunks, sums=sums, coef=coef,
                   loss=loss, r=r, alpha_r=alpha_r, pp=pp)
    return coef


def _geometry(blocks, dtype: torch.dtype, *, fold: bool = False) -> dict:
    """The tile (``BLOCK``) and warps of an elementwise pass over ``dtype`` parameters."""
    block, warps = blocks.elementwise(dtype.itemsize, fold=fold)
    return dict(BLOCK=block, num_warps=warps)


def _norms_geometry(blocks, dtype: torch.dtype, pp: PlusPlusArgs | None) -> dict:
    """A norms launch's geometry: KOALA++'s five float64 accumulators per element of a float64
    tile need twice the threads to stay within 128 registers per thread."""
    geometry = _geometry(blocks, dtype)
    if pp is not None and dtype == torch.float64:
        geometry["num_warps"] *= 2
    return geometry


def _scale_args(plan: StepPlan, stand_in: Tensor) -> dict:
    """The gradient-scale arguments of a pass that reads gradients (``UNSCALE`` with a
    ``GradScaler``'s scale; else a never-read stand-in)."""
    scale = plan.grad_scale
    return dict(p_scale=scale if scale is not None else stand_in, UNSCALE=scale is not None)


def _launch_update(table, plan: StepPlan, plan_wd, coef, device, *, momentum, raw_step=False, fold=False,
                   u_scale=1.0, dist=None, pending=None, plusplus=False) -> None:
    blocks = blocks_for(device)
    for group, dt, ct in _launch_groups(table):
        common = dict(
            p_chunks=group.chunks, p_rows=group.rows, p_wd=plan_wd, p_coef=coef, **_scale_args(plan, coef),
            chunk_base=group.chunk_base, u_scale=float(u_scale), avg_weight=_AVG_WEIGHT[group.dtype],
            DT=dt, CT=ct, CHUNK=blocks.chunk, **_geometry(blocks, group.dtype, fold=fold),
        )
        if fold:
            launch(fold_kernel, (group.n_chunks,), device, p_dist=dist, p_pending=pending, **common)
        else:
            launch(update_kernel, (group.n_chunks,), device, MOMENTUM=momentum, RAW_STEP=raw_step,
                   PLUSPLUS=plusplus, **common)


#: xavg's EMA weight 1 − 0.9 in each parameter dtype's arithmetic dtype, as the PyTorch path
#: applies it (0.1f for 16- and 32-bit params, 0.1 for float64). Host constants.
_AVG_WEIGHT = {
    dtype: float(torch.tensor(1.0 - _kalman.QX_BETA, dtype=FLOAT).to(torch.float64 if dtype == torch.float64 else torch.float32))
    for dtype in _TL_DTYPE
}


def _measured_tables(state: TritonState, kind, plan: StepPlan, arrays, mutated, device) -> tables.Prepared:
    """The (cached) table of a measurement pass: one row per tensor of the plan, slot = row."""
    k = len(plan.params)
    blocks = blocks_for(device)
    return tables.prepare(
        state.tables, kind, plan.params, arrays, mutated, keyed=("x", "g"),
        build=lambda rows, cache: (tables.table(rows, list(range(k)), k, blocks, device, cache),),
    )


def _predict_tail(state: TritonState, table: tables.Table, dist: Tensor, collective, *, a, qv) -> None:
    """Leave the scalar part of a predict pending (the next filter kernel applies it), with the
    distance partials the pass wrote into ``dist``: the table's per-chunk ones, or with DTensor
    shards on several ranks (``collective``) their owned sum over the ranks and the global n."""
    n_dist, numel = table.n_chunks, table.numel
    if collective is not None:
        mask = shards.chunk_mask(table, collective.owner, dist.device)
        dist, n_dist, numel = collective.total(dist[:n_dist], mask), 1, collective.numel
    state.tail = PredictTail(dist=dist, n_dist=n_dist, numel=numel, a=float(a), qv=float(qv))
    state.predict.defer()


def _predict_pass(params, velocities, averages, filt, state: TritonState, *, a, qv, x_scale, scale_u,
                  collective=None) -> None:
    device = state.device
    blocks = blocks_for(device)
    if state.tail is not None and state.predict.deferred:
        # predict twice: the last pass's tail is still pending, apply it before this pass
        # overwrites its partial sums (eager host order; see ``settle`` for graph replays)
        _launch_filter(filt, state, device, MOMENTUM)
    arrays = {"x": params, "u": velocities, "a": averages}
    prepared = tables.prepare(
        state.tables, "m_all", params, arrays, ("x", "u"), keyed=("x",),
        build=lambda rows, cache: (tables.table(rows, [-1] * len(rows), 0, blocks, device, cache),),
    )
    table, = prepared.tables
    dist = _buffer(state, "dist", table.n_chunks, FLOAT, device)
    pending = _pending(state, device)
    prepared.stage_in(arrays)
    if table.n_chunks == 0:
        pending.fill_(1)  # nothing to move; the filter still predicts with D = 0
    for group, dt, ct in _launch_groups(table):
        launch(
            predict_kernel, (group.n_chunks,), device,
            p_chunks=group.chunks, p_rows=group.rows, p_dist=dist, p_pending=pending,
            chunk_base=group.chunk_base, x_scale=float(x_scale), u_mult=float(a),
            DT=dt, CT=ct, CHUNK=blocks.chunk, **_geometry(blocks, group.dtype), SCALE_U=scale_u,
        )
    prepared.stage_back(arrays)
    _predict_tail(state, table, dist, collective, a=a, qv=qv)


class TritonBackend:
    """The Triton path (CUDA, or Triton's CPU interpreter); see the module docstring."""

    name = "triton"
    supports_fold = True

    def new_state(self, predict: PredictState, device: torch.device) -> TritonState:
        return TritonState(predict, device)

    def settle(self, filt, state: TritonState) -> None:
        """Apply deferred predict work now: KOALA-V's deferred predicts (``p += q`` each, torch
        ops, the PyTorch path's exact sequence), or a KOALA-M predict tail.

        KOALA-M: one filter-kernel launch whenever a predict pass has ever run, since only the
        device flag knows whether a tail is pending (a CUDA-graph replay raises it without any
        host code running); the kernel applies a pending tail once and otherwise changes nothing.
        """
        if state.tail is not None:
            _launch_filter(filt, state, state.device, MOMENTUM)
            return
        for _ in range(state.predict.take_deferred()):
            _kalman.predict_v(filt, state.v_q)

    def cache_info(self, state: TritonState) -> dict[str, int]:
        """Table cache counters: ``hits`` (a pass found its tables under the step's signature),
        ``misses`` (tables built: new addresses, sizes or layouts), ``layout_misses`` (of
        those, builds that also laid out the chunks: new sizes; address changes rebuild only
        the O(k) rows)."""
        return state.tables.info()

    # ------------------------------------------------------------------ KOALA-V
    def koala_v_predict(self, filt, state: TritonState, *, q: float) -> None:
        """KOALA-V time update, deferred: counted on the host (no launch); the next filter
        kernel adds q once per deferred predict, ``settle`` does it with torch ops if the filter
        is read first. Under CUDA-graph capture, capture predict() and the update together (the
        count is a kernel argument baked into the graph: each replay adds q exactly once)."""
        state.v_q = float(q)
        state.predict.defer()

    def koala_v_update(self, plan: StepPlan, filt, loss: LossInput, state: TritonState, *, r, alpha_r,
                       raw_grad_step) -> None:
        """KOALA-V measurement update: norms, filter (with the deferred predicts and the loss
        moments), update (3 launches)."""
        device = state.device
        arrays = {"x": plan.params, "g": plan.grads}
        prepared = _measured_tables(state, "v", plan, arrays, ("x",), device)
        table, = prepared.tables
        prepared.stage_in(arrays)
        coef = _measure(plan, table, filt, state, device, ISOTROPIC, loss=loss, r=r, alpha_r=alpha_r)
        _launch_update(table, plan, plan.weight_decay, coef, device, momentum=False, raw_step=raw_grad_step)
        prepared.stage_back(arrays)

    # ------------------------------------------------------------------ KOALA-M
    def koala_m_predict(self, params, velocities, averages, filt, state: TritonState, *, a: float,
                        qv: float, collective=None) -> None:
        """KOALA-M time update: x += u, u *= a (one pass); the covariance part is deferred."""
        _predict_pass(params, velocities, averages, filt, state, a=a, qv=qv, x_scale=1.0, scale_u=True,
                      collective=collective)

    def koala_m_update(self, plan: StepPlan, velocities, averages, filt, loss: LossInput, state: TritonState, *,
                       r, alpha_r) -> None:
        """KOALA-M measurement update: norms, filter (with the pending predict tail), update."""
        device = state.device
        arrays = {"x": plan.params, "g": plan.grads, "u": velocities, "a": averages}
        prepared = _measured_tables(state, "m", plan, arrays, ("x", "u", "a"), device)
        table, = prepared.tables
        prepared.stage_in(arrays)
        coef = _measure(plan, table, filt, state, device, MOMENTUM, loss=loss, r=r, alpha_r=alpha_r)
        _launch_update(table, plan, plan.weight_decay, coef, device, momentum=True)
        prepared.stage_back(arrays)

    # ------------------------------------------------------------------ KOALA++
    def koala_pp_update(self, plan: StepPlan, surrogates, previous, tensors, index, filt, loss: LossInput,
                        state: TritonState, *, sigma, q, symmetric, r, alpha_r) -> None:
        """KOALA++ measurement update: norms (with g̃·h and g̃·v), filter (R, every tensor's
        filter row, the gains), update (v, x, h): 3 launches."""
        device = state.device
        arrays = {"x": plan.params, "g": plan.grads, "u": surrogates, "a": previous}
        prepared = _measured_tables(state, "pp", plan, arrays, ("x", "u", "a"), device)
        table, = prepared.tables
        prepared.stage_in(arrays)
        pp = PlusPlusArgs(tensors=tensors, index=index, sigma=float(sigma), q=float(q), symmetric=bool(symmetric))
        coef = _measure(plan, table, filt, state, device, ISOTROPIC, loss=loss, r=r, alpha_r=alpha_r, pp=pp)
        _launch_update(table, plan, plan.weight_decay, coef, device, momentum=False, plusplus=True)
        prepared.stage_back(arrays)

    # ------------------------------------------------------------------ KOALA-M, fold mode (opt-in)
    def koala_m_predict_deferred(self, params, velocities, averages, filt, state: TritonState, *, a: float,
                                 qv: float, position_scale: float, collective=None) -> None:
        """Fold mode's explicit predict: x += position_scale·u, the velocity buffer left as is.

        In fold mode the velocity buffer holds the posterior velocity u⁺ of the last update;
        after j predicts the filter's velocity is a^j·u⁺ and the position moved by
        (1 + a + … + a^(j-1))·u⁺.
        """
        _predict_pass(params, velocities, averages, filt, state, a=a, qv=qv, x_scale=position_scale,
                      scale_u=False, collective=collective)

    def koala_m_update_folded(self, plan: StepPlan, params, velocities, averages, filt, loss: LossInput,
                              state: TritonState, *, r, alpha_r, a: float, qv: float,
                              velocity_scale: float) -> None:
        """Measurement update fused with the next predict's elementwise part (3 launches).

        Args:
            params, velocities, averages: every parameter (the predict moves all of them), with
                ``plan.indices`` locating the measured ones.
            velocity_scale: a^j for the j predicts since the last update (the velocity buffer
                holds the deferred u⁺).

        Afterwards the weights hold the next prediction x⁺ + u⁺, the velocity buffer u⁺, xavg
        its posterior, and the predict tail is pending (applied by the next filter kernel, or
        by ``settle``).
        """
        device = state.device
        blocks = blocks_for(device)
        k = len(plan.params)
        slot_of = [-1] * len(params)
        grads: list[Tensor | None] = [None] * len(params)
        for slot, (index, g) in enumerate(zip(plan.indices, plan.grads)):
            slot_of[index] = slot
            grads[index] = g
        indices = plan.indices

        def build(rows, cache):
            measured = [rows[i] for i in indices]
            return (tables.table([{"x": r_["x"], "g": r_["g"]} for r_ in measured], list(range(k)), k, blocks, device,
                                 cache),
                    tables.table(rows, slot_of, k, blocks, device, cache))

        # A pending predict tail (this fold's predecessor) is applied by the filter kernel
        # below, before the fold pass overwrites its partial sums.
        arrays = {"x": params, "g": grads, "u": velocities, "a": averages}
        prepared = tables.prepare(state.tables, "m_fold", params, arrays, ("x", "u", "a"), keyed=("x", "g"),
                                  build=build, extra_key=tuple(slot_of))
        plan_table, all_table = prepared.tables
        pending = _pending(state, device)
        prepared.stage_in(arrays)
        coef = _measure(plan, plan_table, filt, state, device, MOMENTUM, loss=loss, r=r, alpha_r=alpha_r)
        # Only now (the filter kernel has consumed the previous fold's partial sums) may the
        # distance buffer be replaced or rewritten.
        dist = _buffer(state, "dist", all_table.n_chunks, FLOAT, device)
        if all_table.n_chunks == 0:
            pending.fill_(1)
        _launch_update(all_table, plan, plan.weight_decay if k else coef, coef, device, momentum=True, fold=True,
                       u_scale=velocity_scale, dist=dist, pending=pending)
        prepared.stage_back(arrays)
        _predict_tail(state, all_table, dist, None if plan.collective is None else plan.collective.predict, a=a, qv=qv)
