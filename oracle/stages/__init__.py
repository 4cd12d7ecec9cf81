"""The derivation stages: each starts from lines of the generic EKF and reads one result off.

The stages mirror :mod:`oracle.ekf` (the EKF of the paper's Table 1): ``predict``, then
``update`` split into gain-and-step and covariance. ``oracle.derive._derive`` runs them in this
order (the per-tensor ones once for each tensor i):

=================  ============================  ===============================================
module             stage                         EKF lines it starts from
=================  ============================  ===============================================
``predict``        ``derive_predict``            x^ = f(x),  P^ = F P F^T + Q
``gain_and_step``  ``derive_observation``        H = dh/dx at x^, h(x^), z = L_target (tensor i)
``gain_and_step``  ``derive_gain_and_step``      S = H P^ H^T + R, K = P^ H^T S^-1,
                                                 x = x^ + K (z - h(x^))           (tensor i)
``covariance``     ``derive_covariance``         P = (I - K H) P^, H^T H -> λ_max·I (tensor i)
``generic``        ``derive_generic_forms``      the per-tensor results, renamed into G, X2, Lt
``covariance``     ``derive_max_contraction``    the contractions h_i of all tensors, their max
``gain_and_step``  ``derive_layerwise_batch``    x = x^ + K (z - h(x^)), all tensors at once
``covariance``     ``derive_stable_covariance``  P = P^ - P^ diag(h, 0) P^, subtraction-free
=================  ============================  ===============================================

Every stage returns its results together with the :class:`oracle.checks.Check` certificates of
those results (field ``checks``, or a list of checks); the orchestrator concatenates them in the
order above. All expressions are SymPy, exact; shapes are those of
:class:`oracle.symbolic_model.SymbolicModel` (state [k·n, 1], covariance [k·n, k·n], one
observation [1, 1] per tensor).
"""

from .covariance import (
    Covariance,
    StableCovariance,
    derive_covariance,
    derive_max_contraction,
    derive_stable_covariance,
)
from .gain_and_step import (
    GainAndStep,
    Observation,
    derive_gain_and_step,
    derive_layerwise_batch,
    derive_observation,
)
from .generic import GenericForms, derive_generic_forms
from .predict import Prior, derive_predict

__all__ = [
    "Prior", "Observation", "GainAndStep", "Covariance", "GenericForms", "StableCovariance",
    "derive_predict", "derive_observation", "derive_gain_and_step", "derive_covariance",
    "derive_generic_forms", "derive_max_contraction", "derive_layerwise_batch",
    "derive_stable_covariance",
]
