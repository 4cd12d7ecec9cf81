"""KoalaPlusPlus and the oracle's KOALA++ side by side (the KOALA++ twin of ``harness.run_restarted``
and ``harness.run_free``; inputs, snapshots and comparisons are ``harness``'s).

* ``run_restarted``: before each update the oracle is restarted from the implementation's exact
  state (weights, v, h, every tensor's S, ‖h‖², h·v and step count, R, the counters); the update's
  arithmetic is then held to ``error_model_pp.update_bounds`` with nothing carried (every dtype).
  ``predict()`` must change nothing, bit for bit.
* ``run_free``: float64, the oracle's own 60-digit trajectory; the bounds are the same model
  carried from step to step. Returns the largest gap relative to each quantity's magnitude.
"""

from __future__ import annotations

import mpmath
import torch

from oracle import DPS, exact, vector
from tests.conformance import error_model as em
from tests.conformance import error_model_pp as epp
from tests.conformance.harness import (
    Mismatch,
    Scenario,
    _per_sample_errors,
    _schedule,
    _update_both,
    build,
    compare_counters,
    compare_scalar,
    compare_tensor,
    compare_unchanged,
    restart_oracle,
    snapshot,
)
from tests.variants import VariantInfo


def _hyper(scenario: Scenario) -> dict:
    h = scenario.hyper
    return {"sigma": h.get("sigma", 0.1), "q": h.get("q", 0.1), "symmetric": h.get("symmetric", True)}


def _predicts(tag: str, opt, flat, variant, n: int) -> None:
    """predict() (n times) changes nothing at all: KOALA++'s time update is inside its update."""
    for k in range(n):
        before = snapshot(opt, flat, variant)
        opt.predict()
        compare_unchanged(f"{tag} predict {k + 1} (does nothing)", before, snapshot(opt, flat, variant))


def _compare(tag: str, opt, flat, oracle, trace, bounds: epp.StateErrors) -> None:
    """Every tensor's x, v, h and filter scalars, R and the counters, within ``bounds``."""
    tf = opt.tensor_filters
    for t in trace.tensors:
        i = t.index
        why = t.reason or ("updated, first step" if t.first else "updated")
        compare_tensor(f"{tag} x[{i}] ({why})", flat[i], oracle.x[i], bounds.x[i])
        compare_tensor(f"{tag} v[{i}] ({why})", opt.state[flat[i]]["v"], oracle.v[i], bounds.v[i])
        compare_tensor(f"{tag} h[{i}] ({why})", opt.state[flat[i]]["h"], oracle.h[i], bounds.h[i])
        for name in ("S", "hh", "hv"):
            compare_scalar(f"{tag} {name}[{i}] ({why})", tf[name][i].item(), getattr(oracle, name)[i],
                           getattr(bounds, name)[i])
        if int(tf["updates"][i].item()) != oracle.updates[i]:
            raise Mismatch(f"{tag} updates[{i}] = {int(tf['updates'][i].item())}, oracle {oracle.updates[i]}")
    compare_scalar(f"{tag} R", opt.filter_state["R"].item(), oracle.R, bounds.R)
    compare_counters(tag, opt, oracle)


def run_restarted(variant: VariantInfo, scenario: Scenario, dtype, impl: dict, device, seed: int = 0) -> int:
    opt, flat, oracle = build(scenario, variant, dtype, impl, device, seed)
    prec = em.Precision(dtype, truncating_store=em.truncates_bfloat16(impl, device, dtype))
    adaptive = scenario.hyper.get("r") is None
    alpha_r = scenario.hyper.get("alpha_r", 0.9)
    frozen = scenario.flat_frozen()
    gen = torch.Generator().manual_seed(1000 + seed)
    for k, step in enumerate(scenario.steps):
        _schedule(step, opt, oracle)
        _predicts(f"step {k}", opt, flat, variant, step.predicts)
        restart_oracle(oracle, snapshot(opt, flat, variant), variant)
        _update_both(opt, oracle, step, flat, frozen, gen, adaptive, device)
        trace = oracle.last_update
        bounds = epp.update_bounds(prec, oracle, trace, _hyper(scenario), adaptive=adaptive, alpha_r=alpha_r,
                                   carried=epp.StateErrors.zero(oracle), inputs=_per_sample_errors(step, adaptive))
        _compare(f"step {k} update", opt, flat, oracle, trace, bounds)
    return len(scenario.steps)


def _relative_gap(opt, flat, oracle) -> mpmath.mpf:
    """The largest |implementation − oracle| over each quantity's magnitude (weights, v, h per
    tensor at its largest element; scalars at their own size)."""
    worst = mpmath.mpf(0)
    with mpmath.workdps(DPS):
        for i, p in enumerate(flat):
            for got, ref in ((p, oracle.x[i]), (opt.state[p]["v"], oracle.v[i]), (opt.state[p]["h"], oracle.h[i])):
                scale = max((abs(r) for r in ref), default=0)
                if scale:
                    worst = max(worst, max(abs(g - r) for g, r in zip(vector(got), ref)) / scale)
            for name in ("S", "hh", "hv"):
                ref = getattr(oracle, name)[i]
                if ref:
                    worst = max(worst, abs(exact(opt.tensor_filters[name][i].item()) - ref) / abs(ref))
        worst = max(worst, abs(exact(opt.filter_state["R"].item()) - oracle.R) / oracle.R)
    return worst


def run_free(variant: VariantInfo, scenario: Scenario, impl: dict, device, seed: int = 0) -> mpmath.mpf:
    dtype = torch.float64
    opt, flat, oracle = build(scenario, variant, dtype, impl, device, seed)
    prec = em.Precision(dtype)
    adaptive = scenario.hyper.get("r") is None
    alpha_r = scenario.hyper.get("alpha_r", 0.9)
    frozen = scenario.flat_frozen()
    gen = torch.Generator().manual_seed(1000 + seed)
    carried = epp.StateErrors.zero(oracle)
    worst = mpmath.mpf(0)
    for k, step in enumerate(scenario.steps):
        _schedule(step, opt, oracle)
        _predicts(f"step {k}", opt, flat, variant, step.predicts)
        oracle.predict()
        _update_both(opt, oracle, step, flat, frozen, gen, adaptive, device)
        carried = epp.update_bounds(prec, oracle, oracle.last_update, _hyper(scenario), adaptive=adaptive,
                                    alpha_r=alpha_r, carried=carried, inputs=_per_sample_errors(step, adaptive))
        _compare(f"step {k} update (free-running)", opt, flat, oracle, oracle.last_update, carried)
        worst = max(worst, _relative_gap(opt, flat, oracle))
    return worst
