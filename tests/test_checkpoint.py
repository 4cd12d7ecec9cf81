"""state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict resumes
bit-for-bit, for every parameter dtype; the filter never loses precision to a dtype cast."""

from __future__ import annotations

import io

import pytest
import torch

from koala_triton import KoalaM, KoalaV
from tests.variants import variant_params

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [(6, 4), (4,), (), (9,)]]


def _iterate(opt, params, step, *, groups_with_grad=None):
    g = torch.Generator().manual_seed(100 + step)
    opt.predict()
    for i, p in enumerate(params):
        p.grad = None if (i == 1 and step % 2) else torch.randn(p.shape, generator=g).to(p.dtype)
    opt.step(loss=torch.rand(8, generator=g) + 0.5)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", variant_params())
def test_checkpoint_resumes_bit_for_bit(variant, dtype):
    params = _params(dtype)
    opt = variant.cls([{"params": params[:2], "weight_decay": 0.01}, {"params": params[2:], "lr": 0.5}])
    for step in range(4):
        _iterate(opt, params, step)
    saved_params = _roundtrip([p.detach().clone() for p in params])
    saved_opt = _roundtrip(opt.state_dict())
    for step in range(4, 8):
        _iterate(opt, params, step)

    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = variant.cls([{"params": resumed[:2]}, {"params": resumed[2:]}])  # different group values
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["weight_decay"] == 0.01 and opt2.param_groups[1]["lr"] == 0.5
    for step in range(4, 8):
        _iterate(opt2, resumed, step)

    for a, b in zip(params, resumed):
        assert torch.equal(a.detach(), b.detach())
    for k, v in opt.filter_state.items():
        assert opt2.filter_state[k].dtype == v.dtype
        assert torch.equal(opt2.filter_state[k], v), k
    for p, q in zip(params, resumed):
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt2.state[q][k])
    for k in variant.tensor_keys:  # KOALA++'s per-tensor filters: float64, exactly
        assert opt2.tensor_filters[k].dtype == torch.float64
        assert torch.equal(opt2.tensor_filters[k], opt.tensor_filters[k]), k


def test_filter_keeps_float64_precision_with_bfloat16_params():
    """torch's load_state_dict casts per-param floating state to the param dtype; the filter
    lives outside it, so a value that bfloat16 cannot represent survives exactly."""
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = KoalaV([p], sigma=0.1234567890123)
    sd = _roundtrip(opt.state_dict())
    opt2 = KoalaV([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)])
    with pytest.warns(UserWarning, match=r"filter settings replace this optimizer's \(sigma: 0.1 -> 0.1234567890123\)"):
        opt2.load_state_dict(sd)
    assert opt2.filter_state["p"].dtype == torch.float64
    assert float(opt2.filter_state["p"]) == 0.1234567890123


def test_filter_hyperparameters_come_back_with_the_checkpoint():
    p = torch.zeros(3, requires_grad=True)
    sd = KoalaM([p], a=0.5, qv=0.2).state_dict()
    opt = KoalaM([torch.zeros(3, requires_grad=True)])
    with pytest.warns(UserWarning, match=r"\(a: 0.9 -> 0.5; qv: 0.01 -> 0.2\)"):
        opt.load_state_dict(sd)
    assert opt._hyper["a"] == 0.5 and opt._hyper["qv"] == 0.2


def test_loading_a_foreign_state_dict_is_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="koala"):
        KoalaV([p]).load_state_dict(torch.optim.SGD([p], lr=0.1).state_dict())
    with pytest.raises(ValueError, match="different optimizer"):
        KoalaV([p]).load_state_dict(KoalaM([p]).state_dict())


def test_checkpoint_between_predict_and_update_resumes_the_pending_update():
    params = _params(torch.float32)
    opt = KoalaM(params)
    _iterate(opt, params, 0)
    opt.predict()
    sd = _roundtrip(opt.state_dict())
    snapshot = [p.detach().clone() for p in params]
    opt2 = KoalaM([p.clone().requires_grad_() for p in snapshot])
    opt2.load_state_dict(sd)
    assert opt2._predict_state.requested is True
    assert torch.equal(opt2.filter_state["Pxx"], opt.filter_state["Pxx"])
