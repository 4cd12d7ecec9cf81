"""Checks of the benchmark harness itself (fast; no timing): parameter-set sizes, the
official-style loop against koala_triton's PyTorch path, state-byte accounting and the report."""

from __future__ import annotations

import json

import pytest
import torch

from bench import param_sets, report
from bench.official_style import OFFICIAL_STYLE
from bench.providers import PROVIDERS, floor_bytes_per_param, optimizer_state_bytes
from tests.variants import case, variant_params


@pytest.mark.parametrize("name, params, tensors", [
    ("resnet18", 11_689_512, 62),
    ("resnet50", 25_557_032, 161),
    ("gpt2-small", 124_439_808, 148),
    ("gpt2-medium", 354_823_168, 292),
    ("many-small-1000x1K", 1_024_000, 1000),
    ("huge-1x256M", 268_435_456, 1),
])
def test_parameter_sets_match_the_real_models(name, params, tensors):
    assert param_sets.count(name) == (params, tensors)


def _torchvision_shapes(name):
    models = pytest.importorskip("torchvision.models")
    with torch.device("meta"):
        return [tuple(p.shape) for p in getattr(models, name)().parameters()]


def _transformers_shapes(n_layer, d_model):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=d_model, n_head=d_model // 64)
    with torch.device("meta"):
        return [tuple(p.shape) for p in transformers.GPT2Model(config).parameters()]


@pytest.mark.parametrize("name, reference", [
    ("resnet18", lambda: _torchvision_shapes("resnet18")),
    ("resnet50", lambda: _torchvision_shapes("resnet50")),
    ("gpt2-small", lambda: _transformers_shapes(12, 768)),
    ("gpt2-medium", lambda: _transformers_shapes(24, 1024)),
])
def test_parameter_shapes_match_torchvision_and_transformers(name, reference):
    """Where torchvision / transformers are installed (e.g. the GPU image), compare shape by shape."""
    assert param_sets.shapes_of(name) == reference()


def test_built_gradients_are_random_and_nonzero():
    ps = param_sets.build("resnet18-w16", torch.float32, torch.device("cpu"))
    assert ps.numel == param_sets.count("resnet18-w16")[0]
    for p in ps.params:
        assert p.grad is not None and p.grad.shape == p.shape
        assert p.grad.norm() > 0 and p.grad.std() > 0


def _twin_params(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (11,), (3, 4, 2), (13,)]
    a = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads[3].zero_()  # a tensor skipped by the ||grad|| < eps rule
    out = []
    for _ in range(2):
        ps = [x.clone().requires_grad_(True) for x in a]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        out.append(ps)
    return out


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("variant", variant_params())
def test_official_style_loop_matches_koala_pytorch_path(variant, weight_decay):
    ours, theirs = _twin_params()
    loop = OFFICIAL_STYLE[variant.id](ours, weight_decay=weight_decay)
    opt = variant.cls(theirs, weight_decay=weight_decay, fused=False)
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        loss = torch.rand(32, generator=gen, dtype=torch.float64) + 0.5
        loop.predict()
        loop.step(loss)
        opt.predict()
        opt.step(loss=loss)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(ours, theirs):
        for key in variant.state_keys:
            torch.testing.assert_close(loop.state[a][key], opt.state[b][key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("provider, expected_fp32", [
    ("official_v", 0.0), ("official_m", 8.0), ("sgdm_foreach", 4.0),
    ("adam_foreach", 8.0), ("adamw_foreach", 8.0)])
def test_state_bytes_are_measured_from_the_optimizer(provider, expected_fp32):
    ps = param_sets.build("many-small-8x1K", torch.float32, torch.device("cpu"))
    stepper = PROVIDERS[provider].build(ps.params)
    stepper.iterate()
    per_param = optimizer_state_bytes(stepper.optimizer) / ps.numel
    # Adam's per-tensor 'step' counters add a few bytes per tensor, not per parameter.
    assert per_param == pytest.approx(expected_fp32, abs=0.01)


@pytest.mark.parametrize("provider, launches", [
    (name, case(p.case).launches) for name, p in PROVIDERS.items() if p.case and p.impl == "triton"])
def test_triton_providers_iterate_under_the_interpreter(monkeypatch, provider, launches):
    """The CPU twin of the GPU benchmark rows: each Triton provider builds the optimizer it
    names and one iteration makes the launches of its design (fold mode: after its first)."""
    pytest.importorskip("triton")
    from koala_triton.kernels import launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ps = param_sets.build("many-small-8x1K", torch.float32, torch.device("cpu"))
    params = ps.params[:3]
    before = [p.detach().clone() for p in params]
    stepper = PROVIDERS[provider].build(params)
    assert stepper.optimizer.uses_triton
    assert getattr(stepper.optimizer, "_fold", False) == case(PROVIDERS[provider].case).fold
    stepper.iterate()
    start = launch.LAUNCHES["count"]
    stepper.iterate()
    assert launch.LAUNCHES["count"] - start == launches
    assert all(p.isfinite().all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


def test_floor_bytes_follow_koala_md_section_7():
    assert floor_bytes_per_param(PROVIDERS["adamw_fused"], torch.float32) == 28
    assert floor_bytes_per_param(PROVIDERS["sgdm_foreach"], torch.float32) == 20
    assert floor_bytes_per_param(PROVIDERS["koala_v_torch"], torch.float32) == 16
    assert floor_bytes_per_param(PROVIDERS["koala_m_triton"], torch.float32) == 36
    assert floor_bytes_per_param(PROVIDERS["adamw_fused"], torch.bfloat16) == 14


def _fake_run(tmp_path, with_fused=True):
    def bench(provider, median, set_name="gpt2-small", dtype="fp32"):
        prov = PROVIDERS[provider]
        return {
            "group": f"{set_name} {dtype}", "name": f"test_optimizer_step[{provider}]",
            "stats": {"median": median, "iqr": median / 10, "min": median * 0.9, "rounds": 5},
            "extra_info": {
                "set": set_name, "dtype": dtype, "provider": provider, "label": prov.label,
                "family": prov.family, "impl": prov.impl, "params": 1000, "tensors": 4,
                "bytes_per_param_floor": prov.bytes_fp32, "bytes_per_step_floor": prov.bytes_fp32 * 1000,
                "copy_gbps": 1.0, "achieved_gbps": prov.bytes_fp32 * 1000 / median / 1e9,
                "fraction_of_copy_bw": prov.bytes_fp32 * 1000 / median / 1e9,
                "launches_per_step": 3, "host_syncs_per_step": None,
                "state_bytes_per_param": 8.0, "state_buffers_per_param": 2.0,
            },
        }
    benches = [bench("koala_v_torch", 2e-3), bench("sgdm_foreach", 1e-3),
               bench("adamw_foreach", 4e-3)]
    if with_fused:
        benches.append(bench("adamw_fused", 2e-3))
    data = {"machine_info": {"koala_bench": {"device": "cpu", "device_name": "test CPU",
                                             "torch": "x", "triton": "y", "mode": "smoke",
                                             "copy_gbps": 1.0}},
            "commit_info": {"id": "abc"}, "datetime": "2026-01-01T00:00:00",
            "benchmarks": benches}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("with_fused, baseline", [(True, "AdamW (fused)"),
                                                  (False, "AdamW (foreach)")])
def test_report_ratios_and_files(tmp_path, capsys, with_fused, baseline):
    path = _fake_run(tmp_path, with_fused)
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out), "--no-plot"]) == 0
    md = (out / "report.md").read_text()
    assert f"Baseline for × AdamW: **{baseline}**" in md
    assert ("no fused AdamW was measured" in md) is (not with_fused)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| optimizer |"))
    row = next(line for line in lines if line.startswith("| KoalaV (PyTorch)"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                     [c.strip() for c in row.strip("|").split("|")]))
    assert cells["× AdamW"] == ("1.00" if with_fused else "0.50")
    assert cells["× SGD-m"] == "2.00"
    assert cells["× floor"] == "125.00"  # 2 ms over (16 kB at 1 GB/s = 16 µs)
    assert cells["median ms"] == "2.000" and cells["state B/param"] == "8.00"
    assert "test CPU" in md
    printed = capsys.readouterr().out.splitlines()
    row = printed[printed.index(next(l for l in printed if l.startswith("step time / AdamW"))) + 2]
    assert row.split()[:4] == ["gpt2-small", "fp32", "2.000" if with_fused else "4.000",
                               "1.00" if with_fused else "0.50"]  # set, dtype, AdamW ms, kV-pt


def test_report_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert report.main([str(_fake_run(tmp_path)), "--out", str(out)]) == 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
