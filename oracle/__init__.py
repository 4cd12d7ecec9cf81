"""The formal oracle for koala_triton (a test dependency; ``koala_triton`` never imports it).

* :mod:`oracle.ekf` — the generic Extended Kalman Filter in SymPy (the KOALA paper's Table 1),
  the only hand-written maths.
* :mod:`oracle.assumptions` — KOALA's assumptions as named, composable switches.
* :mod:`oracle.symbolic_model` — the symbols and the small symbolic model the stages share.
* :mod:`oracle.stages` — the derivation stages: predict, observation, gain and step, covariance.
* :mod:`oracle.derive` — runs the stages per variant; SymPy produces the closed forms.
* :mod:`oracle.paper` — where each derived form comes from in the paper (Davtyan et al., AAAI 2022).
* :mod:`oracle.certificates` — symbolic identities, full-matrix EKF on tiny sizes in exact
  Rationals, and the evaluator against a full-matrix KOALA.
* :mod:`oracle.evaluator` — KOALA-V / KOALA-M trajectories in mpmath at ``DPS`` ≥ 50 digits.
* KOALA++ (Xia, Davtyan, Favaro, NeurIPS 2025): :mod:`oracle.kpp_assumptions` (its switches
  and the least-squares covariance estimates, derived), :mod:`oracle.kpp_derive` (the
  recursion from the EKF), :mod:`oracle.kpp_certificates`, :mod:`oracle.kpp_evaluator`
  (``KoalaPlusPlusOracle``).

``python -m oracle`` prints the derived forms and every certificate; it exits 0 only when all
hold. The mathematics in prose is in ``oracle/README.md``.
"""

from .evaluator import DPS, KoalaMOracle, KoalaVOracle, exact, riccati_fixed_point, vector
from .kpp_evaluator import KoalaPlusPlusOracle

__all__ = ["DPS", "KoalaMOracle", "KoalaPlusPlusOracle", "KoalaVOracle", "exact", "riccati_fixed_point",
           "vector"]
