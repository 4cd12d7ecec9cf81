"""The backend interface (``koala_triton/_backend.py``): both paths implement every method with
the same parameters, so the optimizer face never needs to know which one it drives."""

from __future__ import annotations

import inspect

import pytest
import torch

from koala_triton import _backend
from koala_triton._predict_state import PredictState
from koala_triton._torch_backend import TorchBackend

pytest.importorskip("triton")

from koala_triton._triton_backend import TritonBackend  # noqa: E402


def _methods(cls) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


def test_both_backends_implement_the_protocol_with_the_same_signatures():
    protocol = _methods(_backend.Backend)
    torch_side, triton_side = _methods(TorchBackend), _methods(TritonBackend)
    assert set(protocol) <= set(torch_side) and set(protocol) <= set(triton_side)
    assert set(torch_side) == set(triton_side), "a method exists on one side only"
    for name, signature in protocol.items():
        expected = list(signature.parameters)
        for side, methods in (("torch", torch_side), ("triton", triton_side)):
            got = list(methods[name].parameters)
            assert got == expected, f"{side}.{name}{methods[name]} differs from the protocol's {signature}"
            for param in methods[name].parameters.values():
                assert param.kind == signature.parameters[param.name].kind, f"{side}.{name}: {param.name}"
    for attr in ("name", "supports_fold"):
        assert hasattr(TorchBackend, attr) and hasattr(TritonBackend, attr)


def test_the_pytorch_backend_refuses_fold_mode_clearly():
    backend = TorchBackend()
    assert not backend.supports_fold and TritonBackend.supports_fold
    state = backend.new_state(PredictState(), torch.device("cpu"))
    assert state.predict is not None
    with pytest.raises(NotImplementedError, match="fold"):
        backend.koala_m_predict_deferred([], [], [], {}, state, a=0.9, qv=0.01, position_scale=1.0)
    with pytest.raises(NotImplementedError, match="fold"):
        backend.koala_m_update_folded(None, [], [], [], {}, None, state, r=None, alpha_r=0.9, a=0.9, qv=0.01,
                                      velocity_scale=1.0)


def test_the_predict_state_is_one_object_shared_by_the_optimizer_and_its_backend():
    """A wrapper that copies the optimizer's ``__dict__`` (as some frameworks do) must share the
    predict state, not fork it: a predict through either is seen by both."""
    from koala_triton import KoalaM

    p = torch.randn(3, requires_grad=True)
    opt = KoalaM([p], fused=False)
    assert opt._state.predict is opt._predict_state
    wrapper = object.__new__(KoalaM)
    wrapper.__dict__ = dict(opt.__dict__)  # what such wrappers do
    wrapper.predict()
    assert opt._predict_state.requested and opt._predict_state.time_updates == 1
