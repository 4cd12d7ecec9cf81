"""The KOALA variants that tests and benches run: one registry, ``VARIANTS``.

A *variant* (``VariantInfo``) is one optimizer class with everything the tests need to know
about it: its oracle (``oracle/``), its float64 reference loop (``tests/reference.py``), its
per-parameter state and filter entries, the hyper-parameters of its conformance scenarios, and
its *modes*: named sets of constructor kwargs (``"fixed-r"``, ``"fold"``), each with the number
of Triton launches one iteration makes by design (kernels/NOTES.md).

Every variant table of tests/ and bench/ is built from the registry: ``variant_params`` (one
``pytest.param`` per variant, id ``"V"``), ``case_params`` (one per variant and mode, ids
``"V"``, ``"V-fixed-r"``, ``"M"``, ``"M-fold"``, ``"PP"``, ``"PP-plain"``). A new variant is one entry here plus its
mathematics (the optimizer, the oracle, the reference loop and the error model).

Importing this module imports ``koala_triton`` but not ``oracle`` (SymPy): ``VariantInfo.oracle``
imports it when asked.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import pytest

from koala_triton import KoalaM, KoalaPlusPlus, KoalaV

DEFAULT = "default"


def _frozen(mapping: Mapping | None = None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, eq=False)
class Mode:
    """A named set of constructor kwargs of one variant.

    Attributes:
        name: ``"default"`` (no kwargs; the test id is the variant's alone), ``"fixed-r"``, ...
        kwargs: the constructor kwargs that select the mode.
        launches: Triton launches of one steady-state iteration (predict + step) by design.
        triton_only: the mode exists on the Triton path only (``fused=True``); its PyTorch-path
            twin is the variant's default mode.
    """

    name: str
    kwargs: Mapping[str, object]
    launches: int
    triton_only: bool = False


@dataclass(frozen=True)
class Case:
    """One variant in one of its modes: what a parametrized test receives from ``case_params``."""

    variant: VariantInfo
    mode: Mode

    @property
    def id(self) -> str:
        """The test id: ``"V"`` for a default mode, else ``"<variant>-<mode>"`` (``"M-fold"``)."""
        return self.variant.id if self.mode.name == DEFAULT else f"{self.variant.id}-{self.mode.name}"

    @property
    def slug(self) -> str:
        """The id as a lower-case identifier (``"m_fold"``), for names such as bench providers."""
        return self.id.lower().replace("-", "_")

    @property
    def cls(self) -> type:
        return self.variant.cls

    @property
    def kwargs(self) -> dict:
        """The constructor kwargs of the mode (a fresh dict)."""
        return dict(self.mode.kwargs)

    def kwargs_with(self, **values) -> dict:
        """The mode's kwargs with ``values`` for the keys the mode sets (others ignored):
        ``case.kwargs_with(r=0.3)`` is the fixed-r mode at R = 0.3 and any other mode as is."""
        return {k: values.get(k, v) for k, v in self.mode.kwargs.items()}

    @property
    def twin_kwargs(self) -> dict:
        """The kwargs of the PyTorch-path optimizer a Triton-path one of this case is compared
        with: the mode's, or none for a Triton-only mode (its twin is the default mode)."""
        return {} if self.mode.triton_only else self.kwargs

    @property
    def launches(self) -> int:
        return self.mode.launches

    @property
    def fold(self) -> bool:
        """Fold mode (``KoalaM(fold_predict=True)``): between steps the weights hold the next
        prediction (compare inside ``posterior_weights()``) and the filter the next prior."""
        return bool(self.mode.kwargs.get("fold_predict", False))


@dataclass(frozen=True, eq=False, repr=False)
class VariantInfo:
    """Everything the tests know about one KOALA variant.

    Attributes:
        id: ``"V"``, ``"M"``: the test id and the key in ``VARIANTS``.
        cls: the optimizer class.
        oracle_name: the oracle class's name in the ``oracle`` package (see ``oracle``).
        state_keys: the optimizer's per-parameter state (``opt.state[p]``).
        covariance_keys: the covariance entries of ``filter_state``; the first is the prior
            variance of the weights (P̂xx), the denominator of every gain.
        filter_keys: every float64 entry of ``filter_state`` (the covariance first); the int64
            counters ``step`` and ``skipped_steps`` are not listed.
        scenario_hyper: the constructor kwargs of the conformance scenarios
            (tests/conformance/scenarios.py).
        extra_scenarios: conformance scenarios only this variant has: name -> kwargs on top of
            ``scenario_hyper``.
        modes: the variant's modes, the default first.
        prior_kwargs: ``prior_kwargs(variance, correlation=0.0)``: the kwargs of an initial
            covariance with that variance for the weights (and, with velocities, for them too,
            with that correlation between the two).
        noise_kwargs: ``noise_kwargs(q)``: the kwargs of process noise q on every state.
        reference_name: the class in ``tests/reference.py`` of its float64 reference loop.
        tensor_sums: how many sums over each tensor's elements an update forms (‖g‖², ‖g̃‖²,
            ‖x‖², and KOALA++'s g̃·h and g̃·v): under FSDP2 an update all-reduces that many
            float64 numbers per tensor (``koala_triton/_distributed.StepReduction``).
        tensor_keys: the per-tensor float64 filter entries (``opt.tensor_filters``), if the
            variant keeps one filter per tensor (KOALA++) instead of a global covariance.
    """

    id: str
    cls: type
    oracle_name: str
    state_keys: tuple[str, ...]
    covariance_keys: tuple[str, ...]
    filter_keys: tuple[str, ...]
    scenario_hyper: Mapping[str, object]
    extra_scenarios: Mapping[str, Mapping[str, object]]
    modes: tuple[Mode, ...]
    prior_kwargs: Callable[..., dict]
    noise_kwargs: Callable[[float], dict]
    reference_name: str = "ReferenceKoala"
    tensor_keys: tuple[str, ...] = ()
    tensor_sums: int = 3

    def __repr__(self) -> str:
        return f"VARIANTS[{self.id!r}]"

    @property
    def oracle(self) -> type:
        """The oracle class (``oracle.KoalaVOracle``, ...); imports ``oracle`` (SymPy) on first use."""
        return getattr(importlib.import_module("oracle"), self.oracle_name)

    def reference(self, groups, **hyper):
        """The plain float64 for-loop reference (tests/reference.py) of this variant."""
        from tests import reference

        return getattr(reference, self.reference_name)(groups, variant=self, **hyper)

    @property
    def has_velocity(self) -> bool:
        """Momentum dynamics: a velocity per weight (predict moves the weights by it)."""
        return "velocity" in self.state_keys

    @property
    def weight_variance_key(self) -> str | None:
        """The filter entry of the weights' (prior) variance: ``p`` or ``Pxx``; None for a
        variant without a global covariance (KOALA++)."""
        return self.covariance_keys[0] if self.covariance_keys else None

    @property
    def global_covariance(self) -> bool:
        """One covariance shared by all tensors (KOALA-V, KOALA-M), in ``filter_state``."""
        return bool(self.covariance_keys)

    @property
    def mode_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modes)

    def case(self, mode: str = DEFAULT) -> Case:
        for m in self.modes:
            if m.name == mode:
                return Case(self, m)
        raise KeyError(f"KOALA-{self.id} has no mode {mode!r} (modes: {', '.join(self.mode_names)})")

    def cases(self) -> list[Case]:
        return [Case(self, m) for m in self.modes]


def _isotropic_prior(variance: float, correlation: float = 0.0) -> dict:
    return {"sigma": variance}  # one variance for all weights: no second state to correlate


def _momentum_prior(variance: float, correlation: float = 0.0) -> dict:
    return {"sw": variance, "sc": correlation * variance, "sv": variance}


VARIANTS: dict[str, VariantInfo] = {info.id: info for info in [
    VariantInfo(
        id="V",
        cls=KoalaV,
        oracle_name="KoalaVOracle",
        state_keys=(),
        covariance_keys=("p",),
        filter_keys=("p", "R"),
        scenario_hyper=_frozen({"sigma": 0.2, "q": 0.5, "alpha_r": 0.8}),
        # the official KOALA-V: step along the raw gradient, S and h from g~ (koala_triton/ALGORITHM.md §2)
        extra_scenarios=_frozen({"raw-grad-step": _frozen({"raw_grad_step": True})}),
        # norms, filter, update (the predict is counted on the host and applied in the filter kernel)
        modes=(Mode(DEFAULT, _frozen(), 3), Mode("fixed-r", _frozen({"r": 0.5}), 3)),
        prior_kwargs=_isotropic_prior,
        noise_kwargs=lambda q: {"q": q},
    ),
    VariantInfo(
        id="M",
        cls=KoalaM,
        oracle_name="KoalaMOracle",
        state_keys=("velocity", "xavg"),
        covariance_keys=("Pxx", "Pxu", "Puu"),
        filter_keys=("Pxx", "Pxu", "Puu", "qx", "R"),
        scenario_hyper=_frozen({"sw": 0.2, "sc": 0.02, "sv": 0.1, "a": 0.9, "qw": 1e-2, "qv": 2e-2,
                                "alpha_r": 0.8}),
        # the reduction regime of koala_triton/ALGORITHM.md §6 run through the general code path
        extra_scenarios=_frozen({"momentum-off": _frozen({"a": 0.0, "sv": 0.0, "sc": 0.0, "qv": 0.0})}),
        # predict; norms, filter, update. Fold mode: the update pass also performs the next
        # predict (norms, filter, fold; its first predict is a pass of its own)
        modes=(Mode(DEFAULT, _frozen(), 4), Mode("fold", _frozen({"fold_predict": True}), 3, triton_only=True)),
        prior_kwargs=_momentum_prior,
        noise_kwargs=lambda q: {"qw": q, "qv": q},
    ),
    VariantInfo(
        id="PP",
        cls=KoalaPlusPlus,
        oracle_name="KoalaPlusPlusOracle",
        state_keys=("v", "h"),
        covariance_keys=(),
        filter_keys=("R",),
        scenario_hyper=_frozen({"sigma": 0.2, "q": 0.15, "alpha_r": 0.8}),
        # the authors' other estimate (r = 0)
        extra_scenarios=_frozen({"plain": _frozen({"symmetric": False})}),
        # norms, filter, update (predict does nothing)
        modes=(Mode(DEFAULT, _frozen(), 3), Mode("plain", _frozen({"symmetric": False}), 3)),
        prior_kwargs=_isotropic_prior,
        noise_kwargs=lambda q: {"q": q},
        reference_name="ReferencePlusPlus",
        tensor_keys=("S", "hh", "hv", "updates"),
        tensor_sums=5,
    ),
]}


def variant_of(optimizer) -> VariantInfo:
    """The registry entry of an optimizer (or of its class)."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for info in VARIANTS.values():
        if issubclass(cls, info.cls):
            return info
    raise KeyError(f"{cls.__name__} is not a registered KOALA variant")


def case(case_id: str) -> Case:
    """The case of a test id: ``case("M-fold")``."""
    for info in VARIANTS.values():
        for c in info.cases():
            if c.id == case_id:
                return c
    raise KeyError(f"no KOALA variant and mode with the id {case_id!r}")


def cases(modes: Iterable[str] | None = None, where: Callable[[Case], bool] | None = None) -> list[Case]:
    """Every variant in every mode (or in the named ``modes`` it has), variants in registry order."""
    wanted = None if modes is None else set(modes)
    return [c for info in VARIANTS.values() for c in info.cases()
            if (wanted is None or c.mode.name in wanted) and (where is None or where(c))]


def variant_params(where: Callable[[VariantInfo], bool] | None = None) -> list:
    """One ``pytest.param(VariantInfo)`` per variant (those ``where`` accepts), id ``info.id``."""
    return [pytest.param(info, id=info.id) for info in VARIANTS.values() if where is None or where(info)]


def class_params(by_id: bool = False) -> list:
    """One ``pytest.param(optimizer class)`` per variant, id the class name (``"KoalaV"``), or
    the variant's id (``"V"``) with ``by_id``."""
    return [pytest.param(info.cls, id=info.id if by_id else info.cls.__name__) for info in VARIANTS.values()]


def case_params(modes: Iterable[str] | None = None, *, where: Callable[[Case], bool] | None = None,
                rename: Mapping[str, str] | None = None) -> list:
    """One ``pytest.param(Case)`` per variant and mode (``cases``), id ``case.id``; ``rename``
    maps an id to the one a test has always used (``{"V-fixed-r": "V-r"}``)."""
    rename = rename or {}
    return [pytest.param(c, id=rename.get(c.id, c.id)) for c in cases(modes, where)]
