"""KoalaPlusPlus against the oracle's KOALA++ (``oracle/kpp_evaluator.py``), every state entry
(weights, v, h, each tensor's S, ‖h‖², h·v and step count, R, the counters) at every step.

Error model: ``error_model_pp.py`` (per dtype; the restarted comparison holds each update's
arithmetic to it, the free-running float64 one carries it along the trajectory)."""

from __future__ import annotations

import pytest

from tests.conformance import error_model as em
from tests.conformance import harness, harness_pp
from tests.conformance.scenarios import ids, scenarios
from tests.variants import VARIANTS

pytestmark = pytest.mark.conformance

VARIANT = VARIANTS["PP"]
SCENARIOS = scenarios(VARIANT)


@pytest.mark.parametrize("dtype", harness.DTYPES, ids=[harness.DTYPE_IDS[d] for d in harness.DTYPES])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids(SCENARIOS))
def test_koala_pp_each_step_within_the_error_model_of_its_dtype(scenario, dtype, impl, device):
    steps = harness_pp.run_restarted(VARIANT, scenario, dtype, impl, device)
    assert steps == len(scenario.steps)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids(SCENARIOS))
def test_koala_pp_float64_trajectory_follows_the_oracle(scenario, impl, device):
    worst = harness_pp.run_free(VARIANT, scenario, impl, device)
    # every element was checked against its own carried bound inside; the largest relative gap
    # must also sit inside the float64 target
    assert worst <= em.FLOAT64_TARGET


def _perturbed(monkeypatch, field: str, factor: float):
    """Scale one gain of every KOALA++ measurement by ``factor`` (a planted bug)."""
    from koala_triton import _kalman_pp

    real = _kalman_pp.measure_pp

    def wrong(*args, **kwargs):
        gains, rows = real(*args, **kwargs)
        setattr(gains, field, getattr(gains, field) * factor)
        return gains, rows

    monkeypatch.setattr(_kalman_pp, "measure_pp", wrong)


@pytest.mark.parametrize("field", ["step", "c"])
def test_a_gain_off_by_one_part_in_a_billion_fails_the_float64_model(monkeypatch, field):
    """The error model is tight enough to see a planted 1e-9 error in the step or in the
    coefficient of h in the surrogate's recursion (PyTorch path, float64)."""
    _perturbed(monkeypatch, field, 1 + 1e-9)
    scenario = next(s for s in SCENARIOS if s.id == "groups-and-weight-decay")
    with pytest.raises(harness.Mismatch):
        harness_pp.run_restarted(VARIANT, scenario, harness.DTYPES[0], {"fused": False}, "cpu")
