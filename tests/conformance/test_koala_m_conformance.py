"""KoalaM against the oracle's KOALA-M (koala_triton/ALGORITHM.md §3, §4), every state entry at every step.

Runs on ``impl_m``: every implementation, and fold mode (``fold_predict=True``) where the Triton
path runs (weights compared inside ``posterior_weights()``; see ``harness``)."""

from __future__ import annotations

import pytest

from tests.conformance import error_model as em
from tests.conformance import harness
from tests.conformance.scenarios import ids, scenarios
from tests.variants import VARIANTS

pytestmark = pytest.mark.conformance

VARIANT = VARIANTS["M"]
SCENARIOS = scenarios(VARIANT)


@pytest.mark.parametrize("dtype", harness.DTYPES, ids=[harness.DTYPE_IDS[d] for d in harness.DTYPES])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids(SCENARIOS))
def test_koala_m_each_step_within_the_error_model_of_its_dtype(scenario, dtype, impl_m, device_m):
    steps = harness.run_restarted(VARIANT, scenario, dtype, impl_m, device_m)
    assert steps == len(scenario.steps)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids(SCENARIOS))
def test_koala_m_float64_trajectory_follows_the_oracle(scenario, impl_m, device_m):
    worst = harness.run_free(VARIANT, scenario, impl_m, device_m)
    # every element was checked against its own bound inside (raising on the first one off);
    # the largest relative gap must also sit inside the float64 target
    assert worst <= em.FLOAT64_TARGET
