"""The optimizers being compared, each as "build an optimizer, then run one iteration".

An iteration is what one training step costs the optimizer:

* KOALA (both paths, and the official-style loop): ``predict()`` then ``step(loss=...)``,
  with the gradients already in place (set once, random) and ``loss`` a fixed random positive
  vector of 32 per-sample losses on the device;
* torch.optim: ``step()``.

``bytes_fp32`` is the memory-traffic floor per fp32 parameter from koala_triton/ALGORITHM.md §7 (the least any
implementation of that algorithm must move); for other dtypes it scales with the element size.
KOALA-M's floor is the two-pass form with the next predict folded into the update (36 B), what
``KoalaM(fold_predict=True)`` moves; its three-pass form (predict as its own pass, the default)
is 56 B. KOALA++ reads g, v and h for its three dot products, then x, g, v, h and writes x, v, h:
40 B (44 with weight decay, which also reads x for the dot products; kernels/NOTES.md).

Every provider comes twice: as is (weight decay 0; AdamW's torch default 1e-2), and as a
*paper-recipe* row ``<name>_wd`` with weight decay 5e-4 (the paper's CIFAR recipe; torch's
SGD and Adam as L2, AdamW decoupled). Weight decay makes KOALA read x in its norms pass too:
KOALA-V's floor is 16 B without it, 20 B with it; KOALA-M's 36 B either way (x is read there
already); KOALA++'s 40 B without it, 44 B with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from bench.official_style import OfficialStyleKoalaM, OfficialStyleKoalaPlusPlus, OfficialStyleKoalaV

N_LOSSES = 32
#: The paper's CIFAR weight decay, used by every ``_wd`` provider.
RECIPE_WEIGHT_DECAY = 5e-4


class ProviderUnavailable(Exception):
    """The provider cannot run here (missing device, kernel or package); the test skips."""


@dataclass
class Stepper:
    """A built optimizer and a closure that runs one whole iteration of it."""

    optimizer: object
    iterate: Callable[[], None]


@dataclass(frozen=True)
class Provider:
    name: str           # test id
    label: str          # what the report prints
    family: str         # koala_v, koala_m, koala_pp, sgdm, adam, adamw
    impl: str           # triton, pytorch, official-loop, foreach, fused
    bytes_fp32: int     # koala_triton/ALGORITHM.md §7 floor, bytes per fp32 parameter
    cuda_only: bool
    build: Callable[[list[torch.Tensor]], Stepper]
    #: koala_triton's providers: the KOALA variant and mode they run (``tests/variants.py``: "V",
    #: "M-fold"), else None.
    case: str | None = None
    weight_decay: float | None = None  # None: the provider's default (0, AdamW's 1e-2)


def _random_losses(device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(1234)
    return torch.rand(N_LOSSES, generator=gen, device=device, dtype=torch.float32) + 0.5


def koala_stepper(opt, device) -> Stepper:
    """One KOALA iteration: ``predict()``, then ``step(loss=...)`` with a fixed random loss vector."""
    loss = _random_losses(device)

    def iterate():
        opt.predict()
        opt.step(loss=loss)

    return Stepper(opt, iterate)


def _koala_case(case_id: str):
    """The registry's variant and mode of ``case_id`` (``tests/variants.py``)."""
    try:
        from tests.variants import case
        return case(case_id)
    except ImportError as exc:
        raise ProviderUnavailable(f"koala_triton is not importable: {exc}") from exc


def _koala(case_id: str, fused: bool, weight_decay: float | None = None):
    def build(params):
        c = _koala_case(case_id)
        try:
            opt = c.cls(params, fused=fused, **c.kwargs, **_wd(weight_decay))
        except NotImplementedError as exc:
            raise ProviderUnavailable(f"{c.cls.__name__}(fused={fused}): {exc}") from exc
        return koala_stepper(opt, params[0].device)
    return build


def _koala_provider(name: str, label: str, family: str, impl: str, bytes_fp32: int, case_id: str) -> Provider:
    """koala_triton's optimizer of a registry case on the Triton path (CUDA only) or the PyTorch path."""
    fused = impl == "triton"
    return Provider(name, label, family, impl, bytes_fp32, fused, _koala(case_id, fused), case=case_id)


def _wd(weight_decay: float | None) -> dict:
    return {} if weight_decay is None else {"weight_decay": weight_decay}


def _official(cls, weight_decay: float | None = None):
    def build(params):
        return koala_stepper(cls(params, **_wd(weight_decay)), params[0].device)
    return build


def _torch_optim(kind: str, impl: str, weight_decay: float | None = None):
    def build(params):
        flags = {"foreach": True} if impl == "foreach" else {"fused": True}
        if kind == "sgdm":
            opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9, **_wd(weight_decay), **flags)
        elif kind == "adam":
            opt = torch.optim.Adam(params, lr=1e-3, **_wd(weight_decay), **flags)
        else:
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2 if weight_decay is None else weight_decay,
                                    **flags)
        return Stepper(opt, opt.step)
    return build


def _recipe(p: "Provider") -> "Provider":
    """The paper-recipe row of provider ``p``: the same optimizer with weight decay 5e-4."""
    wd = RECIPE_WEIGHT_DECAY
    if p.case is not None:
        build = _koala(p.case, p.impl == "triton", wd)
    elif p.impl == "official-loop":
        loops = {"koala_v": OfficialStyleKoalaV, "koala_m": OfficialStyleKoalaM, "koala_pp": OfficialStyleKoalaPlusPlus}
        build = _official(loops[p.family], wd)
    else:
        build = _torch_optim(p.family, p.impl, wd)
    bytes_fp32 = {"koala_v": 20, "koala_pp": 44}.get(p.family, p.bytes_fp32)
    return dataclasses.replace(p, name=p.name + "_wd", label=p.label + ", wd 5e-4", bytes_fp32=bytes_fp32,
                               build=build, weight_decay=wd)


_BASE: dict[str, Provider] = {p.name: p for p in [
    _koala_provider("koala_v_triton", "KoalaV (Triton)", "koala_v", "triton", 16, "V"),
    _koala_provider("koala_v_torch", "KoalaV (PyTorch)", "koala_v", "pytorch", 16, "V"),
    _koala_provider("koala_m_triton", "KoalaM (Triton)", "koala_m", "triton", 36, "M"),
    _koala_provider("koala_m_fold_triton", "KoalaM fold_predict (Triton)", "koala_m", "triton", 36, "M-fold"),
    _koala_provider("koala_m_torch", "KoalaM (PyTorch)", "koala_m", "pytorch", 36, "M"),
    _koala_provider("koala_pp_triton", "KoalaPlusPlus (Triton)", "koala_pp", "triton", 40, "PP"),
    _koala_provider("koala_pp_torch", "KoalaPlusPlus (PyTorch)", "koala_pp", "pytorch", 40, "PP"),
    Provider("official_v", "KOALA-V official-style loop", "koala_v", "official-loop", 16, False,
             _official(OfficialStyleKoalaV)),
    Provider("official_m", "KOALA-M official-style loop", "koala_m", "official-loop", 36, False,
             _official(OfficialStyleKoalaM)),
    Provider("official_pp", "KOALA++ authors'-style loop", "koala_pp", "official-loop", 40, False,
             _official(OfficialStyleKoalaPlusPlus)),
    Provider("sgdm_foreach", "SGD momentum (foreach)", "sgdm", "foreach", 20, False,
             _torch_optim("sgdm", "foreach")),
    Provider("sgdm_fused", "SGD momentum (fused)", "sgdm", "fused", 20, False,
             _torch_optim("sgdm", "fused")),
    Provider("adam_foreach", "Adam (foreach)", "adam", "foreach", 28, False,
             _torch_optim("adam", "foreach")),
    Provider("adam_fused", "Adam (fused)", "adam", "fused", 28, False,
             _torch_optim("adam", "fused")),
    Provider("adamw_foreach", "AdamW (foreach)", "adamw", "foreach", 28, False,
             _torch_optim("adamw", "foreach")),
    Provider("adamw_fused", "AdamW (fused)", "adamw", "fused", 28, False,
             _torch_optim("adamw", "fused")),
]}
PROVIDERS: dict[str, Provider] = {**_BASE, **{p.name + "_wd": _recipe(p) for p in _BASE.values()}}


def floor_bytes_per_param(provider: Provider, dtype: torch.dtype) -> float:
    """koala_triton/ALGORITHM.md §7 bytes per parameter, scaled from fp32 to the parameters' element size."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return provider.bytes_fp32 * itemsize / 4


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held in ``optimizer.state`` (every tensor, counted once), measured, not assumed."""
    seen: set[tuple] = set()
    total = 0

    def visit(obj):
        nonlocal total
        if torch.is_tensor(obj):
            key = (obj.data_ptr(), obj.numel(), obj.dtype)  # views of one buffer count apart
            if obj.numel() and key not in seen:
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(dict(getattr(optimizer, "state", {})))
    return total
