"""Where each derived form comes from in the KOALA paper (text only; no mathematics here).

Davtyan, Sameni, Cerkezi, Meishvili, Bielski, Favaro, "KOALA: A Kalman Optimization Algorithm
with Loss Adaptivity", AAAI 2022 (Proceedings 36(6), 6471-6479), arXiv 2107.03331.

The paper states the EKF in its Table 1 and specialises it in the KOALA-V ("vanilla") and KOALA-M
("momentum") sections. The oracle cites those by table and section name, not by equation number.
Notation: the paper's L_target is the oracle's z, its velocity noise qv is the oracle's symbol qu,
and g~ = g + wd·x is the gradient of the regularised loss (``g`` when wd = 0). "Official code"
is the authors' implementation, github.com/Araachie/koala (``koala.py``); "factored here" and
"derived here" mark results this oracle adds to the paper's lines (the official code, for
instance, updates P in the naive form P^ - P^ diag(h, 0) P^).
"""

from __future__ import annotations

__all__ = ["PAPER", "TABLE_1", "SOURCES", "RICCATI_SOURCE", "sources", "PP_PAPER", "PP_SOURCES"]

PAPER = "Davtyan et al., KOALA, AAAI 2022 (arXiv 2107.03331)"

# The paper's Table 1 (the Extended Kalman Filter) and its state-space model, as oracle/ekf.py
# writes them.
TABLE_1 = (
    "model    x_k = f(x_{k-1}) + w,  L_target = L(x_k) + v,  L_target = (1 - lr)·L",
    "predict  x^ = f(x_{k-1}),  P^ = F P F^T + Q",
    "update   S = H P^ H^T + R,  K = P^ H^T / S,  x = x^ + K (L_target - L(x^)),  "
    "P = (I - K H) P^",
)

_V = "KOALA-V section"
_M = "KOALA-M section"
_PREDICT = "Table 1 predict: x^ = f(x_{k-1}), P^ = F P F^T + Q"
_MODEL = "Table 1 model: L_target = L(x_k) + v, H = dL/dx at x^, target L_target = (1 - lr)·L"
_PER_TENSOR = "official code: one observation per tensor i, L~ = L + ½·wd·‖x_i‖²"
_GAIN = "Table 1 update: S = H P^ H^T + R, K = P^ H^T / S, x = x^ + K (L_target - L(x^))"
_COV = "Table 1 update: P = (I - K H) P^"

# (variant, stage) -> the paper's lines a stage of oracle/stages/ starts from, the variant's
# assumptions applied there, and what comes from elsewhere. Stages: Derivation.stages() keys.
SOURCES = {
    ("V", "predict"): (_PREDICT, f"{_V}: f = identity, F = I, P = p·I, Q = q·I"),
    ("M", "predict"): (
        _PREDICT,
        f"{_M}: state [x; u], F = [[1, 1], [0, a]] ⊗ I, P = 2x2 ⊗ I, Q = diag(qx, qv) ⊗ I"),
    ("V", "observation"): (_MODEL, f"{_V}: H = g~^T", _PER_TENSOR),
    ("M", "observation"): (_MODEL, f"{_M}: H = [g~^T, 0]", _PER_TENSOR),
    ("V", "gain and step"): (_GAIN, f"{_V}: P^ = p^·I, so S = p^·G + R and K = p^·g~/S"),
    ("M", "gain and step"): (
        _GAIN, f"{_M}: H = [g~^T, 0], so S = P^xx·G + R and K = [P^xx; P^xu]·g~/S"),
    ("V", "covariance"): (
        _COV, f"{_V}: H^T H replaced by its largest eigenvalue ‖g~‖²·I",
        "official code: the largest h over tensors, naive P^ - P^²·h; stable form: factored here"),
    ("M", "covariance"): (
        _COV, f"{_M}: the block g~g~^T of H^T H replaced by ‖g~‖²·I",
        "official code: the largest h over tensors, naive form; stable forms and ρ: factored here"),
}

RICCATI_SOURCE = (
    "Table 1 predict then update, iterated with KOALA-V's assumptions for constant G, q, R "
    "(a consequence derived and certified here)")


def sources(variant: str, stage: str) -> tuple[str, ...]:
    """The paper's lines (two or three strings) behind ``stage`` of ``variant`` ("V" or "M")."""
    return SOURCES[(variant, stage)]


# KOALA++ (:mod:`oracle.kpp_derive`): the paper and the authors' code behind each stage. "Code" is
# github.com/Sumxiaa/KOALA_Plus_Plus, ``Task1_Image_Classification/koalap.py``.
PP_PAPER = "Xia, Davtyan, Favaro, KOALA++, NeurIPS 2025 (arXiv 2506.04432)"

PP_SOURCES = {
    "gain": (_GAIN, "KOALA++: the directional surrogate v_k = H_k P_{k-1}, identity dynamics, Q·I, "
             "so S_k = v_k·H_k + Q‖H_k‖² + R and K_k = (v_k + Q·H_k)ᵀ/S_k"),
    "surrogate": ("Table 1 update at k-1: P_{k-1} = P^_{k-1} - P^_{k-1} hᵀ h P^_{k-1}/S_{k-1}, multiplied by H_k",
                  "KOALA++: λ from the symmetry of P_{k-2}; H_k P_{k-2} is the term v_{k-1} leaves open"),
    "recursion": ("KOALA++: H_k P_{k-2} from the least-squares estimate of P_{k-2} given h P_{k-2} = v_{k-1} "
                  "(plain or symmetric, the code's is_symmetric)",
                  "code: v_k = (α − λ)·v_{k-1} + Q·(H_k − λ·h) + r·h"),
    "three dots": ("derived here: v_k·H_k from H_k·H_k, H_k·h, H_k·v_{k-1} and last step's scalars "
                   "(the code recomputes ‖h‖², h·v_{k-1} and forms S_k from the vectors)",),
}
