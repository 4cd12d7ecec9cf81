"""Run koala_triton and the oracle side by side on the same numbers and compare every state entry.

Gradients are synthetic: drawn in float64, rounded to the param dtype, set as ``p.grad`` and read
back exactly by the oracle, so both see identical inputs. Magnitudes are bounded away from zero
and from the subnormal range (weights in ±[1/4, 2], gradients in ±[1/4, 1]·scale).

Two modes:
* ``restart``: before each phase (predict, update) the oracle is restarted from the
  implementation's exact state, so the comparison measures one phase's arithmetic and the
  tolerance is the one-phase bound of :mod:`error_model` (every dtype);
* ``free``: the oracle runs its own trajectory; float64 only, tolerance
  :func:`error_model.free_running_rtol` (≤ 1e-12 by assertion); compared after every predict
  and every update.

Fold mode (``KoalaM(fold_predict=True)``, an implementation of its own in ``conftest``): the
update also performs the next predict's elementwise part. Between steps the weights hold the
prediction x+ + u+, the velocity buffer holds u+ (the filter's velocity after j predicts since
the last update is a^j·u+, j counted here, never read from the optimizer), and
``filter_state`` holds the next prior. Both modes then compare the posterior weights inside
``opt.posterior_weights()``, the velocity buffer against u+, and the filter (and the weights
themselves) against the oracle's next prediction; a predict() the last update already did
must change nothing; a further predict() (a double predict) is compared as a predict phase.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import mpmath
import torch

from oracle import DPS, exact, vector
from tests.conformance import error_model as em
from tests.variants import VariantInfo

#: The oracle's (and the snapshots') name of each per-parameter state array.
ORACLE_STATE = {"velocity": "u", "xavg": "xavg", "v": "v", "h": "h"}


def interpreter_enabled() -> bool:
    """Triton kernels run in the CPU interpreter (slow): long tests shrink their example count."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

# A non-contiguous parameter is written ("T", (rows, cols)): a transposed (cols, rows) buffer.
NONCONTIGUOUS = "T"

# Step.loss_var = OMIT: update(loss) without a loss_var (only with a fixed r).
OMIT = "omit"


@dataclass
class Step:
    """One iteration's inputs.

    loss_var: None -> loss² + 1/2; OMIT -> not passed (fixed r only); else the value.
    grads: flat param index -> "none" | "tiny" (‖g‖ = 1e-12·√N < eps) | "nan" | "inf" | a scale;
           indices not named use ``scale``.
    lr, weight_decay: group index -> value written into the group before this step (a scheduler).
    per_sample: use ``step(loss=tensor)`` with these per-sample losses instead of update().
    python_scalars: pass loss and loss_var to update() as the Python numbers they are (as users
        pass ``loss.item()``), not as float64 tensors.
    predicts: predict() calls before the update (2: a double predict; only the first is a time
        update, as ``predict()`` is idempotent within an iteration).
    """

    loss: float = 1.0
    loss_var: float | str | None = None
    scale: float = 1.0
    grads: dict = field(default_factory=dict)
    lr: dict = field(default_factory=dict)
    weight_decay: dict = field(default_factory=dict)
    per_sample: list | None = None
    python_scalars: bool = False
    predicts: int = 1


@dataclass
class Scenario:
    id: str
    groups: list          # [{"shapes": [...], "lr"/"weight_decay"/"eps": ..., "frozen": [local idx]}]
    hyper: dict
    steps: list

    def flat_frozen(self) -> set:
        out, k = set(), 0
        for g in self.groups:
            for j, _ in enumerate(g["shapes"]):
                if j in g.get("frozen", ()):
                    out.add(k)
                k += 1
        return out


def signed_uniform(shape, gen, lo, hi) -> torch.Tensor:
    mag = torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return mag * sign


def build(scenario: Scenario, variant: VariantInfo, dtype, impl: dict, device, seed: int = 0):
    """The optimizer, its flat param list, and the oracle built from the same exact values."""
    gen = torch.Generator().manual_seed(seed)
    torch_groups, oracle_groups, flat = [], [], []
    for spec in scenario.groups:
        params = []
        for shape in spec["shapes"]:
            if isinstance(shape, tuple) and len(shape) == 2 and shape[0] == NONCONTIGUOUS:
                rows, cols = shape[1]
                base = signed_uniform((cols, rows), gen, 0.25, 2.0).to(dtype).to(device)
                t = base.t()
                assert not t.is_contiguous()
            else:
                t = signed_uniform(shape, gen, 0.25, 2.0).to(dtype).to(device)
            params.append(t.requires_grad_())
        overrides = {k: spec[k] for k in ("lr", "weight_decay", "eps") if k in spec}
        torch_groups.append({"params": params, **overrides})
        oracle_groups.append({"params": [p.detach() for p in params], **overrides})
        flat.extend(params)
    opt = variant.cls(torch_groups, **scenario.hyper, **impl)
    oracle = variant.oracle(oracle_groups, **scenario.hyper)
    return opt, flat, oracle


def make_grad(p: torch.Tensor, kind, gen) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "tiny":
        g = torch.full(p.shape, 1e-12, dtype=torch.float64)
    else:
        g = signed_uniform(p.shape, gen, 0.25, 1.0) * float(kind)
    return g.to(p.dtype).to(p.device)


def grads_for(step: Step, flat, frozen: set, gen) -> list:
    out = []
    for i, p in enumerate(flat):
        kind = "none" if i in frozen else step.grads.get(i, step.scale)
        if kind in ("nan", "inf"):
            g = make_grad(p, step.scale, gen)
            if g.numel():
                g.view(-1)[0] = float(kind)
            out.append(g)
        else:
            out.append(make_grad(p, kind, gen))
    return out


# ---------------------------------------------------------------------------------------------
# state snapshots


def state_arrays(variant: VariantInfo) -> list[tuple[str, str]]:
    """(optimizer state key, oracle name) of each per-parameter state array of the variant."""
    return [(key, ORACLE_STATE[key]) for key in variant.state_keys]


def snapshot(opt, flat, variant: VariantInfo) -> dict:
    """Exact copies: "x", the state arrays under their oracle names ("u", "xavg"; KOALA++'s "v",
    "h"), "filter" (every ``filter_state`` entry as a Python number) and "tensors" (KOALA++'s
    per-tensor filters: name -> list of Python numbers; empty for KOALA-V/M)."""
    snap = {"x": [p.detach().clone() for p in flat],
            "filter": {k: v.item() for k, v in opt.filter_state.items()},
            "tensors": {k: opt.tensor_filters[k].tolist() for k in variant.tensor_keys}}
    for key, name in state_arrays(variant):
        snap[name] = [opt.state[p][key].detach().clone() for p in flat]
    return snap


def restart_oracle(oracle, snap: dict, variant: VariantInfo, velocity_scale=None) -> None:
    """Load the implementation's exact state into the oracle. ``velocity_scale`` (fold mode):
    the filter's velocity is velocity_scale·buffer (a^j after j predicts since the update)."""
    f = snap["filter"]
    arrays = {name: snap[name] for _, name in state_arrays(variant)}
    if velocity_scale is not None:
        with mpmath.workdps(DPS):
            arrays["u"] = [[velocity_scale * v for v in vector(t)] for t in arrays["u"]]
    oracle.load(x=snap["x"], step=f["step"], skipped_steps=f["skipped_steps"],
                **{k: f[k] for k in variant.filter_keys}, **arrays,
                **{k: snap["tensors"][k] for k in variant.tensor_keys})


def exact_state(snap: dict, variant: VariantInfo) -> dict:
    with mpmath.workdps(DPS):
        out = {k: exact(v) for k, v in snap["filter"].items()}
        for name in ("x", *(name for _, name in state_arrays(variant))):
            out[name] = [vector(t) for t in snap[name]]
    return out


# ---------------------------------------------------------------------------------------------
# comparisons


class Mismatch(AssertionError):
    pass


def _fmt(v) -> str:
    return mpmath.nstr(v, 12) if isinstance(v, mpmath.mpf) else repr(v)


def compare_tensor(label: str, got: torch.Tensor, ref: list, bound: list) -> None:
    """|got - ref| ≤ bound elementwise; NaN/inf in ``got`` always fails. Reports the first
    mismatching indices with both values, the gap and the bound."""
    with mpmath.workdps(DPS):
        vals = vector(got)
        if len(vals) != len(ref):
            raise Mismatch(f"{label}: {len(vals)} elements, oracle has {len(ref)}")
        bad = []
        for j, (v, r, b) in enumerate(zip(vals, ref, bound)):
            if not mpmath.isfinite(v) or abs(v - r) > b:
                bad.append((j, v, r, abs(v - r) if mpmath.isfinite(v) else v, b))
        if bad:
            lines = [f"  [{j}] got {_fmt(v)} oracle {_fmt(r)} |gap| {_fmt(d)} > bound {_fmt(b)}"
                     for j, v, r, d, b in bad[:4]]
            raise Mismatch(f"{label}: {len(bad)}/{len(vals)} elements outside the error model\n"
                           + "\n".join(lines))


def compare_scalar(label: str, got, ref, bound) -> None:
    with mpmath.workdps(DPS):
        g = exact(got)
        if not mpmath.isfinite(g) or abs(g - ref) > bound:
            raise Mismatch(f"{label}: got {_fmt(g)} oracle {_fmt(ref)} |gap| "
                           f"{_fmt(abs(g - ref))} > bound {_fmt(bound)}")


_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32,
             torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT_VIEW[t.dtype])


def compare_unchanged(label: str, before: dict, after: dict) -> None:
    """Every state entry bit for bit as before (fold mode's predict() after an update; KOALA++'s
    predict())."""
    for key in before:
        if key in ("filter", "tensors"):
            continue
        for i, (b, a) in enumerate(zip(before[key], after[key])):
            if not torch.equal(_bits(b), _bits(a)):
                raise Mismatch(f"{label}: {key}[{i}] changed")
    if before["filter"] != after["filter"]:
        raise Mismatch(f"{label}: filter_state {before['filter']} -> {after['filter']}")
    if before.get("tensors") != after.get("tensors"):
        raise Mismatch(f"{label}: tensor_filters {before.get('tensors')} -> {after.get('tensors')}")


def compare_counters(label: str, opt, oracle) -> None:
    f = opt.filter_state
    got = (int(f["step"].item()), int(f["skipped_steps"].item()))
    want = (oracle.step_count, oracle.skipped_steps)
    if got != want:
        raise Mismatch(f"{label}: (step, skipped_steps) = {got}, oracle {want}")


# ---------------------------------------------------------------------------------------------
# the runner


def _schedule(step: Step, opt, oracle) -> None:
    """A scheduler's writes into the param groups before this step (lr, weight decay)."""
    for key, values in (("lr", step.lr), ("weight_decay", step.weight_decay)):
        for gi, value in values.items():
            opt.param_groups[gi][key] = value
            oracle.param_groups[gi][key] = value


def _update_both(opt, oracle, step, flat, frozen, gen, adaptive, device):
    """Give the implementation and the oracle the same gradients and loss, and update both."""
    grads = grads_for(step, flat, frozen, gen)
    for p, g in zip(flat, grads):
        p.grad = g
    loss, loss_var = _loss_inputs(step, adaptive, device)
    if step.per_sample is not None:
        opt.step(loss=loss)
        oracle.update_from_losses(loss, grads)
    else:
        if loss_var is None:
            opt.update(loss)
        else:
            opt.update(loss, loss_var)
        oracle.update(loss, loss_var if adaptive else None, grads)
    return grads


def _loss_inputs(step: Step, adaptive: bool, device):
    """(loss, loss_var) as update() gets them: float64 device tensors, or the Python numbers
    themselves (``python_scalars``); loss_var None when omitted."""
    if step.per_sample is not None:
        return torch.tensor(step.per_sample, dtype=torch.float64, device=device), None
    if step.loss_var == OMIT:
        assert not adaptive, "loss_var may be omitted only with a fixed r"
        var = None
    else:
        var = step.loss_var if step.loss_var is not None else step.loss**2 + 0.5
    if step.python_scalars:
        return step.loss, var
    loss = torch.tensor(step.loss, dtype=torch.float64, device=device)
    return loss, None if var is None else torch.tensor(var, dtype=torch.float64, device=device)


def _per_sample_errors(step: Step, adaptive: bool) -> em.ScalarInputErrors:
    """Errors of the loss moments the implementation computes from per-sample losses (float64
    mean of B terms: γ(B); mean of squares: γ(B + 1))."""
    if step.per_sample is None:
        return em.ScalarInputErrors()
    B, u = len(step.per_sample), em.UNIT_ROUNDOFF[torch.float64]
    with mpmath.workdps(DPS):
        v = [exact(x) for x in step.per_sample]
        mean_abs = mpmath.fsum(abs(x) for x in v) / B
        m2 = mpmath.fsum(x * x for x in v) / B
        return em.ScalarInputErrors(loss=em.gamma(B, u) * mean_abs,
                                    loss_var=em.gamma(B + 1, u) * m2 if adaptive else mpmath.mpf(0))


class FoldClock:
    """Fold mode's bookkeeping, kept by the harness from the calls it makes (never read from
    the optimizer, so an optimizer that miscounts is caught): ``j`` predicts since the last
    update, counting the one the update folded in (the filter's velocity is a^j·buffer), and
    whether the next predict() was already done by that update (``absorbed``). Outside fold
    mode j stays 0 and the scale is None (the buffer is the velocity)."""

    def __init__(self, fold: bool, a):
        self.fold = fold
        self.j = 0
        self.absorbed = False
        with mpmath.workdps(DPS):
            self.a = exact(a)

    def scale(self, j: int | None = None):
        if not self.fold:
            return None
        with mpmath.workdps(DPS):
            return self.a ** (self.j if j is None else j)

    def predicted(self) -> bool:
        """Count a predict() call; False when it was the one the last update already did."""
        if self.fold and self.absorbed:
            self.absorbed = False
            return False
        if self.fold:
            self.j += 1
        return True

    def updated(self) -> None:
        if self.fold:
            self.j, self.absorbed = 1, True


def _fold(impl: dict) -> bool:
    return bool(impl.get("fold_predict"))


def _filter_but_r(variant: VariantInfo) -> list[str]:
    """The filter entries a predict and an update change besides R (bounds of their own)."""
    return [k for k in variant.filter_keys if k != "R"]


def run_restarted(variant: VariantInfo, scenario: Scenario, dtype, impl: dict, device, seed: int = 0) -> int:
    """Every step: restart the oracle from the implementation, compare after each predict and
    after the update against the one-phase error model. Returns the number of compared steps."""
    opt, flat, oracle = build(scenario, variant, dtype, impl, device, seed)
    prec = em.Precision(dtype, truncating_store=em.truncates_bfloat16(impl, device, dtype))
    hyper = scenario.hyper
    adaptive = hyper.get("r") is None
    alpha_r = hyper.get("alpha_r", 0.9)
    a, qv = hyper.get("a", 0.9), hyper.get("qv", 1e-2)
    frozen = scenario.flat_frozen()
    gen = torch.Generator().manual_seed(1000 + seed)
    clock = FoldClock(_fold(impl), a)
    assert not clock.fold or "fold" in variant.mode_names
    for k, step in enumerate(scenario.steps):
        _schedule(step, opt, oracle)
        assert step.predicts >= 1
        for n in range(step.predicts):
            tag = f"step {k} predict" + (f" {n + 1}/{step.predicts}" if step.predicts > 1 else "")
            if n == 0:
                _restarted_predict(tag, opt, flat, oracle, variant, prec, clock, a, qv)
            else:  # predict() is idempotent within an iteration: the oracle predicts once
                before = snapshot(opt, flat, variant)
                opt.predict()
                compare_unchanged(f"{tag} (a second predict does nothing)", before, snapshot(opt, flat, variant))
        _restarted_update(f"step {k} update", opt, flat, oracle, variant, prec, clock, step, frozen,
                          gen, adaptive, alpha_r, hyper, device, a, qv)
    return len(scenario.steps)


def _restarted_predict(tag, opt, flat, oracle, variant, prec, clock, a, qv) -> None:
    before = snapshot(opt, flat, variant)
    j = clock.j
    if not clock.predicted():  # fold mode: the last update already predicted
        opt.predict()
        compare_unchanged(f"{tag} (already done by the folded update)", before, snapshot(opt, flat, variant))
        return
    restart_oracle(oracle, before, variant, clock.scale(j))
    u_hat = [list(us) for us in oracle.u] if variant.has_velocity else None
    opt.predict()
    oracle.predict()
    ex_before = exact_state(before, variant)
    if variant.has_velocity:
        b = em.predict_bounds_m(prec, ex_before, oracle, a, qv)
    else:
        b = em.predict_bounds_v(prec, oracle.p)
    for name in _filter_but_r(variant):
        compare_scalar(f"{tag} {name}^", opt.filter_state[name], getattr(oracle, name), b[name])
    if not variant.has_velocity:
        for i, p in enumerate(flat):  # identity dynamics: weights untouched, bit for bit
            compare_tensor(f"{tag} x[{i}]", p, oracle.x[i], [0] * len(oracle.x[i]))
    else:
        if clock.fold:
            # x <- x + a^j·u+ with the buffer left as is (it keeps u+; the filter's velocity
            # a^(j+1)·u+ is formed by the next update)
            bx = em.fold_predict_position_bounds(prec, ex_before["x"], u_hat, oracle.x, j)
            after = snapshot(opt, flat, variant)
            for i, p in enumerate(flat):
                compare_tensor(f"{tag} x^[{i}] (fold: x + a^{j}·u+)", p, oracle.x[i], bx[i])
                if not torch.equal(_bits(after["u"][i]), _bits(before["u"][i])):
                    raise Mismatch(f"{tag} velocity[{i}]: fold mode's predict must leave the buffer (u+) as is")
        else:
            for i, p in enumerate(flat):
                compare_tensor(f"{tag} x^[{i}]", p, oracle.x[i], b["x"][i])
                compare_tensor(f"{tag} u^[{i}]", opt.state[p]["velocity"], oracle.u[i], b["u"][i])
        for i, p in enumerate(flat):
            compare_tensor(f"{tag} xavg[{i}] (untouched by predict)", opt.state[p]["xavg"],
                           oracle.xavg[i], [0] * len(oracle.xavg[i]))
    compare_scalar(f"{tag} R (untouched by predict)", opt.filter_state["R"], oracle.R, 0)
    compare_counters(tag, opt, oracle)


def _restarted_update(tag, opt, flat, oracle, variant, prec, clock, step, frozen, gen, adaptive,
                      alpha_r, hyper, device, a, qv) -> None:
    mid = snapshot(opt, flat, variant)
    j = clock.j
    restart_oracle(oracle, mid, variant, clock.scale(j))
    ex_mid = exact_state(mid, variant)
    velocity_error = None
    if clock.fold:  # the kernel forms û = fl(a^j)·u+ itself: its error enters u+ (error_model)
        velocity_error = em.fold_velocity_errors(prec, oracle.u, j)
    _update_both(opt, oracle, step, flat, frozen, gen, adaptive, device)
    clock.updated()
    trace = oracle.last_update
    bounds = em.update_bounds(prec, oracle, trace, variant=variant, adaptive=adaptive,
                              alpha_r=alpha_r, prior=ex_mid,
                              raw_grad_step=hyper.get("raw_grad_step", False),
                              inputs=_per_sample_errors(step, adaptive), velocity_error=velocity_error)
    bx_inside = bounds["x"]
    if clock.fold:
        x_post = [list(v) for v in oracle.x]
        bx_inside, bx_outside = em.fold_weight_bounds(prec, x_post, oracle.u, bounds["x"], bounds["u"])
    if variant.has_velocity:
        with opt.posterior_weights():  # a no-op outside fold mode
            for t in trace.tensors:
                compare_tensor(f"{tag} x[{t.index}] ({t.reason or 'updated'}; posterior_weights())",
                               flat[t.index], oracle.x[t.index], bx_inside[t.index])
        for t in trace.tensors:
            i = t.index
            compare_tensor(f"{tag} u[{i}] ({t.reason or 'updated'})",
                           opt.state[flat[i]]["velocity"], oracle.u[i], bounds["u"][i])
            compare_tensor(f"{tag} xavg[{i}] ({t.reason or 'updated'})",
                           opt.state[flat[i]]["xavg"], oracle.xavg[i], bounds["xavg"][i])
    else:
        for t in trace.tensors:
            compare_tensor(f"{tag} x[{t.index}] ({t.reason or 'updated'})", flat[t.index],
                           oracle.x[t.index], bounds["x"][t.index])
    compare_scalar(f"{tag} R", opt.filter_state["R"], oracle.R, bounds["R"])
    compare_counters(tag, opt, oracle)
    if clock.fold:
        # the filter already holds the next prior and the weights the next prediction: the
        # oracle predicts from its exact posterior, the bounds carry the update's errors on
        post = {"x": x_post, "u": [list(v) for v in oracle.u], "Pxx": oracle.Pxx, "Pxu": oracle.Pxu,
                "Puu": oracle.Puu, "qx": oracle.qx}
        oracle.predict()
        nb = em.fold_next_prior_bounds(prec, post, bounds, oracle, a, qv)
        for name in _filter_but_r(variant):
            compare_scalar(f"{tag} {name} (fold: the next prior)", opt.filter_state[name],
                           getattr(oracle, name), nb[name])
        for i, p in enumerate(flat):
            compare_tensor(f"{tag} weights[{i}] (fold: the next prediction x+ + u+)", p, oracle.x[i],
                           bx_outside[i])
        return
    for name in _filter_but_r(variant):
        bound = bounds.get(name, mpmath.mpf(0))  # qx is not touched by the update
        compare_scalar(f"{tag} {name}", opt.filter_state[name], getattr(oracle, name), bound)


def run_free(variant: VariantInfo, scenario: Scenario, impl: dict, device, seed: int = 0) -> mpmath.mpf:
    """float64, no restarts: the oracle's own 60-digit trajectory against the implementation's,
    compared after every predict and every update (and after one more predict at the end, so
    that the last update's next prior is compared too). Returns the largest relative gap seen
    (for reporting); raises on any gap over the bound."""
    dtype = torch.float64
    opt, flat, oracle = build(scenario, variant, dtype, impl, device, seed)
    hyper = scenario.hyper
    adaptive = hyper.get("r") is None
    frozen = scenario.flat_frozen()
    gen = torch.Generator().manual_seed(1000 + seed)
    clock = FoldClock(_fold(impl), hyper.get("a", 0.9))
    prec = em.Precision(dtype)
    n_max = max((p.numel() for p in flat), default=1)
    with mpmath.workdps(DPS):
        path = [mpmath.mpf(max((abs(v) for v in xs), default=0)) for xs in oracle.x]
        vpath = [mpmath.mpf(0) for _ in flat]
        max_c_wd = mpmath.mpf(0)
    worst = mpmath.mpf(0)
    # steps of the error budget: the updates; a predict is part of the step it begins (the
    # budget of that step's update), and a repeated predict() does nothing
    phases = 0

    def check(label, got, ref, scale, rtol, extra=None):
        nonlocal worst
        with mpmath.workdps(DPS):
            if isinstance(got, list):
                vals = got
            else:
                vals = vector(got) if isinstance(got, torch.Tensor) else [exact(got)]
            refs = ref if isinstance(ref, list) else [ref]
            for j, (v, r) in enumerate(zip(vals, refs)):
                gap = abs(v - r) / scale if scale else abs(v - r)
                worst = max(worst, gap)
                allowed = rtol * scale + (extra[j] if extra is not None else 0)
                if not mpmath.isfinite(v) or abs(v - r) > allowed:
                    raise Mismatch(f"{label}[{j}]: got {_fmt(v)} oracle {_fmt(r)}, |gap| "
                                   f"{_fmt(abs(v - r))} > rtol {_fmt(rtol)} × scale {_fmt(scale)}"
                                   + (f" + {_fmt(extra[j])}" if extra is not None else ""))

    def rtol_for(steps):
        rtol = em.free_running_rtol(steps, n_max, max_c_wd)
        if rtol > em.FLOAT64_TARGET:
            raise AssertionError(f"scenario needs rtol {_fmt(rtol)} > the float64 target "
                                 f"{em.FLOAT64_TARGET}: shrink it rather than widen the target")
        return rtol

    def compare(tag, *, after_update):
        rtol = rtol_for(phases if after_update else phases + 1)
        f = opt.filter_state
        if variant.has_velocity and after_update:
            extra = [None] * len(flat)
            if clock.fold:  # posterior_weights() recomputes x+ = x_w - u+ (error_model)
                with mpmath.workdps(DPS):
                    bx = [[rtol * path[i]] * len(xs) for i, xs in enumerate(oracle.x)]
                    bu = [[rtol * vpath[i]] * len(us) for i, us in enumerate(oracle.u)]
                inside, _ = em.fold_weight_bounds(prec, oracle.x, oracle.u, bx, bu)
                extra = [[v - b for v, b in zip(ins, bs)] for ins, bs in zip(inside, bx)]
            with opt.posterior_weights():
                for i, p in enumerate(flat):
                    check(f"{tag} x[{i}] (posterior_weights())", p, oracle.x[i], path[i], rtol, extra[i])
        else:
            for i, p in enumerate(flat):
                check(f"{tag} x[{i}]", p, oracle.x[i], path[i], rtol)
        if variant.has_velocity:
            # the filter's velocity: the buffer, or in fold mode a^j·buffer between predicts
            scale = None if after_update else clock.scale()
            for i, p in enumerate(flat):
                got = opt.state[p]["velocity"]
                if scale is not None:
                    with mpmath.workdps(DPS):
                        got = [scale * v for v in vector(got)]
                check(f"{tag} u[{i}]", got, oracle.u[i], vpath[i], rtol)
                check(f"{tag} xavg[{i}]", opt.state[p]["xavg"], oracle.xavg[i], path[i], rtol)
        if not (clock.fold and after_update):  # fold: the filter holds the next prior
            # covariance entries at the covariance's size (p; Pxx + |Pxu| + Puu), others at their own
            cov = oracle.Pxx + abs(oracle.Pxu) + oracle.Puu if variant.has_velocity else oracle.p
            for name in _filter_but_r(variant):
                value = getattr(oracle, name)
                check(f"{tag} {name}", f[name], value, cov if name in variant.covariance_keys else value, rtol)
        check(f"{tag} R", f["R"], oracle.R, oracle.R, rtol)
        compare_counters(tag, opt, oracle)

    def predict_both(tag):
        nonlocal phases
        opt.predict()
        oracle.predict()
        clock.predicted()
        if variant.has_velocity:  # the momentum move x^ = x + u is part of the weights' path
            with mpmath.workdps(DPS):
                for i, us in enumerate(oracle.u):
                    path[i] += max((abs(v) for v in us), default=0)
        compare(tag, after_update=False)

    for k, step in enumerate(scenario.steps):
        _schedule(step, opt, oracle)
        predict_both(f"step {k} predict")
        for n in range(1, step.predicts):  # predict() is idempotent: nothing more happens
            opt.predict()
            compare(f"step {k} predict {n + 1}/{step.predicts} (does nothing)", after_update=False)
        _update_both(opt, oracle, step, flat, frozen, gen, adaptive, device)
        clock.updated()
        phases += 1
        with mpmath.workdps(DPS):
            for t in oracle.last_update.tensors:
                if t.updated:
                    path[t.index] += max((abs(t.c_x * d) for d in t.direction), default=0)
                    if variant.has_velocity:
                        vpath[t.index] += max((abs(t.c_u * d) for d in t.direction), default=0)
                    max_c_wd = max(max_c_wd, abs(t.c_x) * t.wd)
        compare(f"step {k} update", after_update=True)
    predict_both("final predict")
    return worst
