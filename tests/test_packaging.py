"""What ``pip install koala-triton`` brings (pyproject.toml), and that the package works
without triton: a CPU-only install stays small (torch's CUDA wheels bring triton themselves)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requirements}


def test_core_install_is_torch_alone():
    assert _names(pyproject()["project"]["dependencies"]) == {"torch"}


def test_extras_bring_triton_for_tests_and_the_comparisons_needs():
    extras = pyproject()["project"]["optional-dependencies"]
    for extra in ("test", "triton"):
        (triton,) = [r for r in extras[extra] if r.startswith("triton")]
        assert "platform_system == 'Linux'" in triton, extra  # no wheels elsewhere
    assert {"scikit-learn", "tqdm", "matplotlib"} <= _names(extras["compare"])


def test_the_pytorch_path_trains_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # any import of triton now raises ImportError
import torch, koala_triton
from koala_triton import KoalaM, KoalaV
assert not koala_triton.triton_available()
torch.manual_seed(0)
x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
for cls in (KoalaM, KoalaV):
    m = torch.nn.Linear(4, 2)
    before = m.weight.detach().clone()
    opt = cls(m.parameters())
    for _ in range(5):
        opt.predict()
        losses = torch.nn.functional.cross_entropy(m(x), y, reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step(loss=losses.detach())
    assert not opt.uses_triton and sys.modules["triton"] is None, cls
    assert torch.isfinite(m.weight).all() and not torch.equal(m.weight, before), cls
    assert int(opt.filter_state["step"]) == 5 and int(opt.filter_state["skipped_steps"]) == 0, cls
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
