"""Run koala_triton and the oracle side by side on the same numbers and compare every state entry.

Gradients are synthetic: drawn in float64, rounded to the param dtype, set as ``p.grad`` and read
back exactly by the oracle, so both see identical inputs. Magnitudes are bounded away from zero
and from the subnormal range (weights in ±[1/4, 2], gradients in ±[1/4, 1]·scale).

Two modes:
* ``restart``: before each phase (predict, update) the oracle is restarted from the
  implementation's exact state, so the comparison measures one phase's arithmetic and the
  tolerance is the one-phase bound of :mod:`error_model` (every dtype);
* ``free``: the oracle runs its own trajectory; float64 only, tolerance
  :func:`error_model.free_running_rtol` (≤ 1e-12 by assertion).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import mpmath
import torch

from koala_triton import KoalaM, KoalaV
from oracle import DPS, KoalaMOracle, KoalaVOracle, exact, vector
from tests.conformance import error_model as em

VARIANTS = {"V": (KoalaV, KoalaVOracle), "M": (KoalaM, KoalaMOracle)}


def interpreter_enabled() -> bool:
    """Triton kernels run in the CPU interpreter (slow): long tests shrink their example count."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

# A non-contiguous parameter is written ("T", (rows, cols)): a transposed (cols, rows) buffer.
NONCONTIGUOUS = "T"


@dataclass
class Step:
    """One iteration's inputs.

    grads: flat param index -> "none" | "tiny" (‖g‖ = 1e-12·√N < eps) | "nan" | "inf" | a scale;
           indices not named use ``scale``.
    lr: group index -> lr written into the group before this step (a scheduler).
    per_sample: use ``step(loss=tensor)`` with these per-sample losses instead of update().
    """

    loss: float = 1.0
    loss_var: float | None = None
    scale: float = 1.0
    grads: dict = field(default_factory=dict)
    lr: dict = field(default_factory=dict)
    per_sample: list | None = None


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


def _signed_uniform(shape, gen, lo, hi) -> torch.Tensor:
    mag = torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return mag * sign


def build(scenario: Scenario, variant: str, dtype, impl: dict, device, seed: int = 0):
    """The optimizer, its flat param list, and the oracle built from the same exact values."""
    gen = torch.Generator().manual_seed(seed)
    torch_groups, oracle_groups, flat = [], [], []
    for spec in scenario.groups:
        params = []
        for shape in spec["shapes"]:
            if isinstance(shape, tuple) and len(shape) == 2 and shape[0] == NONCONTIGUOUS:
                rows, cols = shape[1]
                base = _signed_uniform((cols, rows), gen, 0.25, 2.0).to(dtype).to(device)
                t = base.t()
                assert not t.is_contiguous()
            else:
                t = _signed_uniform(shape, gen, 0.25, 2.0).to(dtype).to(device)
            params.append(t.requires_grad_())
        overrides = {k: spec[k] for k in ("lr", "weight_decay", "eps") if k in spec}
        torch_groups.append({"params": params, **overrides})
        oracle_groups.append({"params": [p.detach() for p in params], **overrides})
        flat.extend(params)
    cls, oracle_cls = VARIANTS[variant]
    opt = cls(torch_groups, **scenario.hyper, **impl)
    oracle = oracle_cls(oracle_groups, **scenario.hyper)
    return opt, flat, oracle


def make_grad(p: torch.Tensor, kind, gen) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "tiny":
        g = torch.full(p.shape, 1e-12, dtype=torch.float64)
    else:
        g = _signed_uniform(p.shape, gen, 0.25, 1.0) * float(kind)
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


def snapshot(opt, flat, variant: str) -> dict:
    snap = {"x": [p.detach().clone() for p in flat],
            "filter": {k: v.item() for k, v in opt.filter_state.items()}}
    if variant == "M":
        snap["u"] = [opt.state[p]["velocity"].detach().clone() for p in flat]
        snap["xavg"] = [opt.state[p]["xavg"].detach().clone() for p in flat]
    return snap


def restart_oracle(oracle, snap: dict, variant: str) -> None:
    f = snap["filter"]
    common = dict(x=snap["x"], R=f["R"], step=f["step"], skipped_steps=f["skipped_steps"])
    if variant == "V":
        oracle.load(p=f["p"], **common)
    else:
        oracle.load(u=snap["u"], xavg=snap["xavg"], Pxx=f["Pxx"], Pxu=f["Pxu"], Puu=f["Puu"],
                    qx=f["qx"], **common)


def exact_state(snap: dict, variant: str) -> dict:
    with mpmath.workdps(DPS):
        out = {k: exact(v) for k, v in snap["filter"].items()}
        out["x"] = [vector(t) for t in snap["x"]]
        if variant == "M":
            out["u"] = [vector(t) for t in snap["u"]]
            out["xavg"] = [vector(t) for t in snap["xavg"]]
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


def compare_counters(label: str, opt, oracle) -> None:
    f = opt.filter_state
    got = (int(f["step"].item()), int(f["skipped_steps"].item()))
    want = (oracle.step_count, oracle.skipped_steps)
    if got != want:
        raise Mismatch(f"{label}: (step, skipped_steps) = {got}, oracle {want}")


# ---------------------------------------------------------------------------------------------
# the runner


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
        opt.update(loss, loss_var)
        oracle.update(loss, loss_var if adaptive else None, grads)
    return grads


def _loss_inputs(step: Step, adaptive: bool, device):
    if step.per_sample is not None:
        return torch.tensor(step.per_sample, dtype=torch.float64, device=device), None
    loss = torch.tensor(step.loss, dtype=torch.float64, device=device)
    var = step.loss_var if step.loss_var is not None else step.loss**2 + 0.5
    return loss, torch.tensor(var, dtype=torch.float64, device=device)


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


def run_restarted(variant: str, scenario: Scenario, dtype, impl: dict, device, seed: int = 0) -> int:
    """Every step: restart the oracle from the implementation, compare after predict and after
    update against the one-phase error model. Returns the number of compared steps."""
    opt, flat, oracle = build(scenario, variant, dtype, impl, device, seed)
    prec = em.Precision(dtype, truncating_store=em.truncates_bfloat16(impl, device, dtype))
    hyper = scenario.hyper
    adaptive = hyper.get("r") is None
    alpha_r = hyper.get("alpha_r", 0.9)
    frozen = scenario.flat_frozen()
    gen = torch.Generator().manual_seed(1000 + seed)
    for k, step in enumerate(scenario.steps):
        for gi, lr in step.lr.items():
            opt.param_groups[gi]["lr"] = lr
            oracle.param_groups[gi]["lr"] = lr
        # ---- predict
        before = snapshot(opt, flat, variant)
        restart_oracle(oracle, before, variant)
        opt.predict()
        oracle.predict()
        tag = f"step {k} predict"
        ex_before = exact_state(before, variant)
        if variant == "V":
            b = em.predict_bounds_v(prec, oracle.p)
            compare_scalar(f"{tag} p^", opt.filter_state["p"], oracle.p, b["p"])
            for i, p in enumerate(flat):  # identity dynamics: weights untouched, bit for bit
                compare_tensor(f"{tag} x[{i}]", p, oracle.x[i], [0] * len(oracle.x[i]))
        else:
            b = em.predict_bounds_m(prec, ex_before, oracle, hyper.get("a", 0.9), hyper.get("qv", 1e-2))
            for name in ("qx", "Pxx", "Pxu", "Puu"):
                compare_scalar(f"{tag} {name}", opt.filter_state[name], getattr(oracle, name), b[name])
            for i, p in enumerate(flat):
                compare_tensor(f"{tag} x^[{i}]", p, oracle.x[i], b["x"][i])
                compare_tensor(f"{tag} u^[{i}]", opt.state[p]["velocity"], oracle.u[i], b["u"][i])
                compare_tensor(f"{tag} xavg[{i}] (untouched by predict)", opt.state[p]["xavg"],
                               oracle.xavg[i], [0] * len(oracle.xavg[i]))
        compare_scalar(f"{tag} R (untouched by predict)", opt.filter_state["R"], oracle.R, 0)
        compare_counters(tag, opt, oracle)
        # ---- update
        mid = snapshot(opt, flat, variant)
        restart_oracle(oracle, mid, variant)
        ex_mid = exact_state(mid, variant)
        _update_both(opt, oracle, step, flat, frozen, gen, adaptive, device)
        trace = oracle.last_update
        tag = f"step {k} update"
        prior = dict(ex_mid)
        if variant == "V":
            prior["p"] = ex_mid["p"]
        bounds = em.update_bounds(prec, oracle, trace, variant=variant, adaptive=adaptive,
                                  alpha_r=alpha_r, prior=prior,
                                  raw_grad_step=hyper.get("raw_grad_step", False),
                                  inputs=_per_sample_errors(step, adaptive))
        for t in trace.tensors:
            i = t.index
            compare_tensor(f"{tag} x[{i}] ({t.reason or 'updated'})", flat[i], oracle.x[i], bounds["x"][i])
            if variant == "M":
                compare_tensor(f"{tag} u[{i}] ({t.reason or 'updated'})",
                               opt.state[flat[i]]["velocity"], oracle.u[i], bounds["u"][i])
                compare_tensor(f"{tag} xavg[{i}] ({t.reason or 'updated'})",
                               opt.state[flat[i]]["xavg"], oracle.xavg[i], bounds["xavg"][i])
        names = ("p",) if variant == "V" else ("Pxx", "Pxu", "Puu", "qx")
        for name in names:
            bound = bounds.get(name, mpmath.mpf(0))  # qx is not touched by the update
            compare_scalar(f"{tag} {name}", opt.filter_state[name], getattr(oracle, name), bound)
        compare_scalar(f"{tag} R", opt.filter_state["R"], oracle.R, bounds["R"])
        compare_counters(tag, opt, oracle)
    return len(scenario.steps)


def run_free(variant: str, scenario: Scenario, impl: dict, device, seed: int = 0) -> mpmath.mpf:
    """float64, no restarts: the oracle's own 60-digit trajectory against the implementation's.
    Returns the largest relative gap seen (for reporting); raises on any gap over the bound."""
    dtype = torch.float64
    opt, flat, oracle = build(scenario, variant, dtype, impl, device, seed)
    adaptive = scenario.hyper.get("r") is None
    frozen = scenario.flat_frozen()
    gen = torch.Generator().manual_seed(1000 + seed)
    n_max = max((p.numel() for p in flat), default=1)
    with mpmath.workdps(DPS):
        path = [mpmath.mpf(max((abs(v) for v in xs), default=0)) for xs in oracle.x]
        vpath = [mpmath.mpf(0) for _ in flat]
        max_c_wd = mpmath.mpf(0)
    worst = mpmath.mpf(0)

    def check(label, got, ref, scale, rtol):
        nonlocal worst
        with mpmath.workdps(DPS):
            vals = vector(got) if isinstance(got, torch.Tensor) else [exact(got)]
            refs = ref if isinstance(ref, list) else [ref]
            for j, (v, r) in enumerate(zip(vals, refs)):
                gap = abs(v - r) / scale if scale else abs(v - r)
                worst = max(worst, gap)
                if not mpmath.isfinite(v) or abs(v - r) > rtol * scale:
                    raise Mismatch(f"{label}[{j}]: got {_fmt(v)} oracle {_fmt(r)}, |gap| "
                                   f"{_fmt(abs(v - r))} > rtol {_fmt(rtol)} × scale {_fmt(scale)}")

    for k, step in enumerate(scenario.steps):
        for gi, lr in step.lr.items():
            opt.param_groups[gi]["lr"] = lr
            oracle.param_groups[gi]["lr"] = lr
        opt.predict()
        oracle.predict()
        if variant == "M":  # the momentum move x^ = x + u is part of the weights' path
            with mpmath.workdps(DPS):
                for i, us in enumerate(oracle.u):
                    path[i] += max((abs(v) for v in us), default=0)
        _update_both(opt, oracle, step, flat, frozen, gen, adaptive, device)
        with mpmath.workdps(DPS):
            for t in oracle.last_update.tensors:
                if t.updated:
                    path[t.index] += max((abs(t.c_x * d) for d in t.direction), default=0)
                    if variant == "M":
                        vpath[t.index] += max((abs(t.c_u * d) for d in t.direction), default=0)
                    max_c_wd = max(max_c_wd, abs(t.c_x) * t.wd)
            rtol = em.free_running_rtol(k + 1, n_max, max_c_wd)
        if rtol > em.FLOAT64_TARGET:
            raise AssertionError(f"scenario needs rtol {_fmt(rtol)} > the float64 target "
                                 f"{em.FLOAT64_TARGET}: shrink it rather than widen the target")
        tag = f"step {k}"
        for i, p in enumerate(flat):
            check(f"{tag} x[{i}]", p, oracle.x[i], path[i], rtol)
            if variant == "M":
                check(f"{tag} u[{i}]", opt.state[p]["velocity"], oracle.u[i], vpath[i], rtol)
                check(f"{tag} xavg[{i}]", opt.state[p]["xavg"], oracle.xavg[i], path[i], rtol)
        f = opt.filter_state
        if variant == "V":
            check(f"{tag} p", f["p"], oracle.p, oracle.p, rtol)
        else:
            scale = oracle.Pxx + abs(oracle.Pxu) + oracle.Puu
            for name in ("Pxx", "Pxu", "Puu"):
                check(f"{tag} {name}", f[name], getattr(oracle, name), scale, rtol)
            check(f"{tag} qx", f["qx"], oracle.qx, oracle.qx, rtol)
        check(f"{tag} R", f["R"], oracle.R, oracle.R, rtol)
        compare_counters(tag, opt, oracle)
    return worst
