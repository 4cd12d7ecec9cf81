"""Bad hyper-parameters and bad parameters fail at construction with a clear error."""

from __future__ import annotations

import pytest
import torch

from koala_triton import KoalaM, KoalaV
from tests.variants import class_params


def _p():
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (KoalaV, {"lr": -1.0}, "lr"),
        (KoalaV, {"sigma": -0.1}, "sigma"),
        (KoalaV, {"q": -1.0}, "q"),
        (KoalaV, {"r": -0.5}, "r"),
        (KoalaV, {"weight_decay": -1e-4}, "weight_decay"),
        (KoalaV, {"eps": -1.0}, "eps"),
        (KoalaV, {"alpha_r": 1.0}, "alpha_r"),
        (KoalaV, {"alpha_r": -0.1}, "alpha_r"),
        (KoalaV, {"lr": float("nan")}, "lr"),
        (KoalaV, {"q": float("inf")}, "q"),
        (KoalaM, {"lr": -1.0}, "lr"),
        (KoalaM, {"a": 1.5}, "a"),
        (KoalaM, {"a": -0.1}, "a"),
        (KoalaM, {"sw": -0.1}, "sw"),
        (KoalaM, {"sv": -0.1}, "sv"),
        (KoalaM, {"qw": -1e-3}, "qw"),
        (KoalaM, {"qv": -1e-3}, "qv"),
        (KoalaM, {"r": -1.0}, "r"),
        (KoalaM, {"weight_decay": -1.0}, "weight_decay"),
        (KoalaM, {"alpha_r": 1.0}, "alpha_r"),
    ],
)
def test_bad_hyperparameter_raises_value_error_naming_it(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cls(_p(), **kwargs)


@pytest.mark.parametrize("sw, sc, sv", [(0.1, 0.2, 0.1), (0.0, 0.01, 1.0)])
def test_koala_m_rejects_a_covariance_that_is_not_positive_semidefinite(sw, sc, sv):
    with pytest.raises(ValueError, match="positive semi-definite"):
        KoalaM(_p(), sw=sw, sc=sc, sv=sv)


def test_koala_m_accepts_a_singular_psd_covariance():
    KoalaM(_p(), sw=0.1, sc=0.1, sv=0.1)  # det = 0: semi-definite is allowed


@pytest.mark.parametrize("cls", class_params())
def test_unknown_keyword_raises_type_error(cls):
    with pytest.raises(TypeError):
        cls(_p(), momentum=0.9)


@pytest.mark.parametrize("cls", class_params())
def test_hyperparameters_are_keyword_only(cls):
    with pytest.raises(TypeError):
        cls(_p(), 1.0, 0.1)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="fused"):
        KoalaV(_p(), fused="yes")
    with pytest.raises(TypeError, match="raw_grad_step"):
        KoalaV(_p(), raw_grad_step=1)
    with pytest.raises(TypeError, match="sigma"):
        KoalaV(_p(), sigma="0.1")


@pytest.mark.parametrize("cls, key", [(KoalaV, "q"), (KoalaV, "sigma"), (KoalaM, "a"), (KoalaM, "qv")])
def test_filter_hyperparameters_cannot_differ_per_group(cls, key):
    with pytest.raises(ValueError, match=key):
        cls([{"params": _p(), key: 0.5}])


def test_group_values_are_validated():
    with pytest.raises(ValueError, match="weight_decay"):
        KoalaV([{"params": _p(), "weight_decay": -1.0}])
    with pytest.raises(ValueError, match="lr"):
        KoalaM([{"params": _p()}, {"params": _p(), "lr": -0.1}])


@pytest.mark.parametrize("cls", class_params())
def test_complex_params_are_refused(cls):
    with pytest.raises(ValueError, match="complex"):
        cls([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])


def test_integer_params_are_refused():
    with pytest.raises(ValueError, match="floating point"):
        KoalaV([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("cls", class_params())
def test_sparse_gradients_are_refused_without_touching_weights(cls):
    p = torch.ones(4, requires_grad=True)
    opt = cls([p])
    before = p.detach().clone()
    opt.predict()
    p.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(loss=torch.rand(3))
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("cls", class_params())
def test_a_sparse_gradient_after_dense_steps_is_refused_without_touching_weights(cls):
    """The step layout is cached from the dense steps; the sparse gradient is still refused."""
    p = torch.ones(4, requires_grad=True)
    opt = cls([p])
    for _ in range(2):
        opt.predict()
        p.grad = torch.ones(4)
        opt.step(loss=torch.rand(3))
    opt.predict()
    before = p.detach().clone()
    filt = {k: v.clone() for k, v in opt.filter_state.items()}
    p.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(loss=torch.rand(3))
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.filter_state[k], v) for k, v in filt.items())


def test_fused_true_without_kernels_or_gpu_is_a_clear_error():
    # CPU tensors without TRITON_INTERPRET: the Triton path cannot run here.
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("under TRITON_INTERPRET=1 fused=True runs the kernels on the CPU")
    with pytest.raises((NotImplementedError, RuntimeError), match="[Tt]riton"):
        KoalaV(_p(), fused=True)


@pytest.mark.parametrize("cls", class_params())
def test_fused_false_and_none_use_the_pytorch_path_on_cpu(cls):
    assert cls(_p(), fused=False).uses_triton is False
    assert cls(_p(), fused=None).uses_triton is False


@pytest.mark.parametrize("name", ["weight_decay", "eps"])
@pytest.mark.parametrize("cls", class_params())
def test_a_tensor_weight_decay_or_eps_set_on_a_group_is_refused_without_touching_weights(cls, name):
    """Set after construction (add_param_group validates its own): reading a device tensor on
    the host would synchronise, so the step refuses it with the name; only lr may be a tensor."""
    p = torch.ones(4, requires_grad=True)
    opt = cls([p])
    opt.predict()
    before = p.detach().clone()
    opt.param_groups[0][name] = torch.tensor(0.1)
    p.grad = torch.ones(4)
    with pytest.raises(TypeError, match=name):
        opt.step(loss=torch.rand(3))
    assert torch.equal(p.detach(), before)
