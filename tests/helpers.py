"""Helpers shared by the test modules (no test module imports from another one).

Fixtures, comparisons and guards:

- the PyTorch path against the float64 reference loop (``tests/reference.py``):
  ``reference_params``, ``reference_groups``, ``reference_grads``, ``assert_close`` (error
  model: identical float64 expressions in another order, 1e-12);
- no host reads inside a step: ``forbid_host_reads``;
- the Triton path against the PyTorch path (``test_triton_interpreter.py``, its GPU twin
  ``test_triton_gpu.py``, ``test_triton_host_cache.py``): ``make_params``, ``clone_params``,
  ``groups``, ``grads_for_step``, ``losses_for_step``, ``assign``, ``assert_close_scaled``,
  ``magnitude``, ``compare_states``, ``run_pair`` (error model: test_triton_interpreter.py's
  module docstring), and ``round_bf16_like_the_gpu`` for the interpreter.
"""

from __future__ import annotations

import contextlib

import torch

from tests.variants import Case, variant_of

# ------------------------------------------------------------ PyTorch path vs the reference loop
#: The PyTorch path (float64) against the reference loop: the same float64 expressions in
#: another order (test_matches_reference.py's module docstring).
REFERENCE_RTOL = 1e-12


def reference_params(dtype=torch.float64, seed=0):
    """Eight leaf tensors: matrices, a bias, a 0-dim scalar, an empty tensor, a
    non-contiguous (transposed) matrix, and a large-ish vector."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (), (0,), (7, 2), (11,), (4, 4), (257,)]
    params = []
    for i, shape in enumerate(shapes):
        if i == 4:  # non-contiguous: a transposed (2, 7) buffer
            base = torch.randn(2, 7, generator=g, dtype=torch.float64).t()
            t = torch.empty_strided(shape, (1, 7), dtype=dtype).copy_(base)
            assert not t.is_contiguous()
        else:
            t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        params.append(t.requires_grad_())
    return params


def reference_groups(params):
    """Two groups of ``reference_params``: different lr and weight decay."""
    return [
        {"params": params[:4], "lr": 0.7, "weight_decay": 0.0, "eps": 1e-9},
        {"params": params[4:], "lr": 0.4, "weight_decay": 0.05, "eps": 1e-9},
    ]


def reference_grads(params, step, gen, scale: float = 1.0):
    """Random float64 grads (times ``scale``) for ``reference_params`` with a schedule of the
    awkward cases: params[1] has no grad on even steps (None); params[5] gets a tiny gradient
    (norm < eps) every third step: skipped; on step 7 no tensor has a gradient at all (a no-op
    update)."""
    grads = []
    for i, p in enumerate(params):
        if step == 7 or (i == 1 and step % 2 == 0):
            grads.append(None)
        elif i == 5 and step % 3 == 0:
            grads.append(torch.full(p.shape, 1e-12, dtype=torch.float64))
        else:
            grads.append(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return grads


def assert_close(actual, expected, what, rtol=REFERENCE_RTOL):
    """|actual - expected| <= rtol·|expected| + rtol·max|expected| elementwise.

    Elementwise x - c*g can cancel, so the error is relative to the tensor's magnitude, not
    to each (possibly tiny) element: atol = rtol * max|expected|."""
    if not isinstance(expected, torch.Tensor):
        expected = torch.tensor(expected, dtype=torch.float64)
    scale = float(expected.detach().double().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=rtol * scale + 1e-300, msg=lambda m: f"{what}: {m}")


def assert_matches_reference(opt, params, ref, what, *, state_keys=None, filter_keys=None) -> None:
    """Weights, per-parameter state and filter entries of ``opt`` against the reference loop
    ``ref`` (``assert_close``): every state and float filter entry of the variant, or the
    ``state_keys`` / ``filter_keys`` named."""
    info = variant_of(opt)
    for i, (p, x) in enumerate(zip(params, ref.params())):
        assert_close(p, x, f"{what} param {i}")
    for key in info.state_keys if state_keys is None else state_keys:
        for i, (p, expected) in enumerate(zip(params, ref.state(key))):
            assert_close(opt.state[p][key], expected, f"{what} {key} {i}")
    expected = ref.filter_values()
    for key in info.filter_keys if filter_keys is None else filter_keys:
        assert_close(opt.filter_state[key], expected[key], f"{what} {key}")


# ------------------------------------------------------------ no host reads inside a step
#: Reading a device value on the host: each of these is a device-to-host synchronisation on a
#: GPU. On CPU there is no CUDA sync-debug mode, so tests forbid the reads themselves.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def forbid_host_reads():
    """Inside the block, ``Tensor.item``, ``tolist``, ``__bool__`` (a Python ``if`` on a
    tensor), ``__float__``, ``__int__`` and ``__index__`` raise an AssertionError."""
    def refuse(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} inside a step")
        return raiser

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


# ------------------------------------------------------------ Triton path vs the PyTorch path
#: Awkward sizes: 0-dim, empty, 1, primes, a few multi-dim, and tensors larger than one
#: interpreter tile (64 elements) or chunk (128), not multiples of either.
SIZES = [(), (1,), (0,), (2,), (3,), (5,), (7,), (11,), (13,), (3, 5), (17,), (31,), (2, 3, 5), (4, 4), (37,)]
BIG = [(67,), (131,), (16, 17), (257,)]
#: One unit in the last place, relative, of each storage dtype.
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def round_bf16_like_the_gpu(monkeypatch):
    """Make the interpreter round fp32 -> bf16 to nearest even, as the GPU does.

    A kernel's ``x.to(tl.bfloat16)`` compiles to ``cvt.rn.bf16.f32`` (round to nearest even;
    checked in test_triton_compile.py), but triton 3.9's interpreter truncates that
    conversion (``_convert_float`` with no rounding mode). Left alone, every bf16 store in
    these tests would round differently from the GPU and from PyTorch. fp16 is unaffected
    (the interpreter uses numpy's correctly rounded cast)."""
    import numpy as np
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        import triton.language as tl

        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)


def make_params(n: int, dtype: torch.dtype, seed: int = 0, *, odd_layouts: bool = True, device="cpu",
                big=BIG) -> list[torch.Tensor]:
    """``n`` leaf tensors cycling through SIZES, four larger than a chunk, plus (with
    ``odd_layouts``) a transposed (dense), a strided (non-dense: staged) and a misaligned
    (storage offset of one element: staged) parameter, and a frozen one."""
    g = torch.Generator().manual_seed(seed)
    shapes = [SIZES[i % len(SIZES)] for i in range(n - len(big))] + list(big)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    params = [randn(s).requires_grad_() for s in shapes]
    if odd_layouts:
        params[5] = randn(3, 7).t().detach().requires_grad_()
        params[6] = randn(6, 10)[:, ::2].detach().requires_grad_()
        params[7] = randn(52)[1:50].detach().requires_grad_()
        params[8] = randn(9).requires_grad_(False)  # frozen
        assert params[5].stride() == (1, 7) and not params[6].is_contiguous()
    return params


def clone_params(params):
    """Copies with the same strides and storage offset (so strided and misaligned parameters
    stay strided and misaligned: ``clone()`` would make them contiguous)."""
    out = []
    for p in params:
        storage = torch.empty(p.untyped_storage().nbytes() // p.element_size(), dtype=p.dtype, device=p.device)
        q = storage.as_strided(p.shape, p.stride(), p.storage_offset())
        q.copy_(p.detach())
        out.append(q.detach().requires_grad_(p.requires_grad))
    return out


def groups(params):
    """Two groups: different lr, weight decay and skip threshold."""
    half = len(params) // 2
    return [
        {"params": params[:half], "lr": 0.7, "weight_decay": 0.0, "eps": 1e-9},
        {"params": params[half:], "lr": 0.4, "weight_decay": 0.05, "eps": 1e-7},
    ]


def grads_for_step(params, step: int, gen: torch.Generator, dtype: torch.dtype):
    # drawn on the CPU (one generator for every device), then moved
    """The schedule of awkward cases: per-step None grads, tiny (skipped) grads, frozen params,
    a step without any grad (4), a NaN gradient (9: the whole measurement is skipped)."""
    out = []
    for i, p in enumerate(params):
        if not p.requires_grad or step == 4 or i % 7 == step % 7:
            out.append(None)
        elif i % 11 == step % 11:
            out.append(torch.full(p.shape, 1e-12, dtype=torch.float64).to(device=p.device, dtype=dtype))
        else:
            out.append(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=dtype))
    if step == 9:
        target = next(j for j, gr in enumerate(out) if gr is not None and gr.numel() > 2)
        out[target].view(-1)[1] = float("nan")
    return out


def losses_for_step(step: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    per_sample = torch.rand(8, generator=gen, dtype=torch.float64) * 2
    if step == 12:
        per_sample[3] = float("inf")  # non-finite loss: skipped
    return per_sample.to(device)


def assign(params, grads):
    for p, gr in zip(params, grads):
        if gr is None:
            p.grad = None
        else:
            # the same values; keep the parameter's layout like autograd does for dense params
            p.grad = gr.clone() if p.is_contiguous() else torch.empty_like(p).copy_(gr)


def assert_same_steps(opt_a, params_a, opt_b, params_b) -> None:
    """Two runs took the same steps: their weights and their filters are equal bit for bit."""
    for i, (x, y) in enumerate(zip(params_a, params_b)):
        assert torch.equal(x, y), f"weights {i}"
    for key, value in opt_a.filter_state.items():
        assert torch.equal(opt_b.filter_state[key], value), key


def assert_close_scaled(actual, expected, rtol, what, scale=None):
    """|actual - expected| <= rtol * scale, scale = max|expected| unless given.

    Elementwise x − c·g and u = a·u − c·g can cancel, so errors are measured against the
    magnitude of the values, not each (possibly tiny) element."""
    if scale is None:
        scale = float(expected.detach().double().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0.0, atol=rtol * scale + 1e-30,
                               equal_nan=False, msg=lambda m: f"{what}: {m}")


def magnitude(tensors) -> float:
    """The largest |value| over all ``tensors`` (0 for none or only empty ones)."""
    return max((float(t.detach().double().abs().max()) for t in tensors if t.numel()), default=0.0)


def assert_state_close_scaled(ref_opt, tri_opt, ref_params, tri_params, rtol, what="") -> None:
    """Every per-parameter state array of the variant (velocity, xavg) within ``rtol`` of the
    magnitude of its kind across all tensors (``assert_close_scaled``)."""
    for key in variant_of(ref_opt).state_keys:
        scale = magnitude(ref_opt.state[a][key] for a in ref_params)
        for i, (a, b) in enumerate(zip(ref_params, tri_params)):
            assert_close_scaled(tri_opt.state[b][key], ref_opt.state[a][key], rtol, f"{what}{key} {i}", scale)


def compare_states(ref_opt, tri_opt, ref_params, tri_params, rtol, what):
    """Params, the variant's per-parameter state (velocities, xavg) and the filter. An array is
    compared at the magnitude of its kind across all tensors (a velocity that is a small
    difference of two larger terms carries the absolute error of those terms; see
    ``assert_close_scaled``)."""
    for i, (a, b) in enumerate(zip(ref_params, tri_params)):
        assert_close_scaled(b, a, rtol, f"{what}: param {i} {tuple(a.shape)}")
    assert_state_close_scaled(ref_opt, tri_opt, ref_params, tri_params, rtol, f"{what}: ")
    ref_f, tri_f = ref_opt.filter_state, tri_opt.filter_state
    for key, value in ref_f.items():
        if value.dtype == torch.int64:
            assert int(tri_f[key]) == int(value), f"{what}: filter {key}"
        else:
            torch.testing.assert_close(tri_f[key], value, rtol=max(rtol, 1e-6), atol=0.0,
                                       msg=lambda m: f"{what}: filter {key}: {m}")


def posterior_weights(opt, fold: bool):
    """``opt.posterior_weights()`` in fold mode (its weights hold the next prediction), else a
    no-op context."""
    return opt.posterior_weights() if fold else contextlib.nullcontext()


def check_one_element_model(case: Case, shape, device="cpu"):
    """A model of one element in all (compiled Triton makes every integer argument equal to 1 a
    compile-time constant) stepped 4 times on both paths, with a step without a gradient (the
    filter kernel's no-tensor launch) in between: the weight and the state match the PyTorch
    path's within 1e-5 of their scale (a few float32 roundings of one element per step).
    Returns (Triton optimizer, PyTorch optimizer) for further checks."""
    tri_p = [torch.randn(shape, device=device).requires_grad_()]
    ref_p = clone_params(tri_p)
    tri = case.cls(tri_p, fused=True, **case.kwargs)
    ref = case.cls(ref_p, fused=False, **case.twin_kwargs)
    gen = torch.Generator(device=device).manual_seed(8)
    for step in range(4):
        tri.predict()
        ref.predict()
        g = None if step == 2 else torch.randn(shape, device=device, generator=gen)
        tri_p[0].grad, ref_p[0].grad = g, None if g is None else g.clone()
        loss = torch.rand(4, device=device, generator=gen)
        tri.step(loss=loss)
        ref.step(loss=loss)
    with posterior_weights(tri, case.fold):
        assert_close_scaled(tri_p[0], ref_p[0], 1e-5, "weight")
    for key in case.variant.state_keys:
        assert_close_scaled(tri.state[tri_p[0]][key], ref.state[ref_p[0]][key], 1e-5, key)
    return tri, ref


def run_pair(case: Case, dtype, n, steps, *, seed=0, odd_layouts=True, per_step=None, device="cpu",
             big=BIG, **kwargs):
    """Step a PyTorch-path and a Triton-path optimizer of ``case`` through the same schedule
    (the PyTorch path in the case's ``twin_kwargs``; both with ``kwargs``).

    ``per_step(step, ref_opt, tri_opt, ref_params, tri_params)`` runs after every update.
    In fold mode the Triton weights hold the prediction between steps; the comparison then
    looks inside ``posterior_weights()`` and at u (the reference holds u⁺ there too)."""
    ref_params = make_params(n, dtype, seed, odd_layouts=odd_layouts, device=device, big=big)
    tri_params = clone_params(ref_params)
    ref = case.cls(groups(ref_params), fused=False, **kwargs, **case.twin_kwargs)
    tri = case.cls(groups(tri_params), fused=True, **kwargs, **case.kwargs)
    assert tri.uses_triton and not ref.uses_triton
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        ref.predict()
        tri.predict()
        grads = grads_for_step(ref_params, step, gen, dtype)
        assign(ref_params, grads)
        assign(tri_params, grads)
        loss = losses_for_step(step, gen, device)
        ref.step(loss=loss)
        tri.step(loss=loss)
        if per_step is not None:
            per_step(step, ref, tri, ref_params, tri_params)
    return ref, tri, ref_params, tri_params
