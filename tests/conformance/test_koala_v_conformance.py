"""KoalaV against the oracle's KOALA-V (koala_triton/ALGORITHM.md §2, §4), every state entry at every step."""

from __future__ import annotations

import pytest

from tests.conformance import error_model as em
from tests.conformance import harness
from tests.conformance.scenarios import ids, scenarios
from tests.variants import VARIANTS

pytestmark = pytest.mark.conformance

VARIANT = VARIANTS["V"]
SCENARIOS = scenarios(VARIANT)


@pytest.mark.parametrize("dtype", harness.DTYPES, ids=[harness.DTYPE_IDS[d] for d in harness.DTYPES])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids(SCENARIOS))
def test_koala_v_each_step_within_the_error_model_of_its_dtype(scenario, dtype, impl, device):
    steps = harness.run_restarted(VARIANT, scenario, dtype, impl, device)
    assert steps == len(scenario.steps)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=ids(SCENARIOS))
def test_koala_v_float64_trajectory_follows_the_oracle(scenario, impl, device):
    worst = harness.run_free(VARIANT, scenario, impl, device)
    # every element was checked against its own bound inside (raising on the first one off);
    # the largest relative gap must also sit inside the float64 target
    assert worst <= em.FLOAT64_TARGET
