"""The kernels compile for a real GPU target, without a GPU.

Triton can compile to PTX for a named target (here sm_90, an H100) on any machine: the
interpreter tests check what the kernels compute; these check that the compiled form is the
one the design relies on:

- every pass compiles for every supported dtype, and the filter kernel for every flag set;
- the elementwise passes use 128-bit vector loads and stores (``ld.global.v4.b32`` /
  ``v2.b64``) on their full tiles: the alignment hints and the unmasked full-tile loop work;
- stores to bf16 round to nearest even (``cvt.rn.bf16``), the behaviour the interpreter tests
  emulate (the interpreter itself truncates).
"""

from __future__ import annotations

import inspect
import re

import pytest

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from koala_triton.kernels import kalman as filter_module  # noqa: E402
from koala_triton.kernels import passes  # noqa: E402
from koala_triton.kernels.launch import CUDA_BLOCKS  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compiled(fn, signature: dict, constexprs: dict, num_warps: int = 4):
    names = list(inspect.signature(fn).parameters)
    sig = {n: signature.get(n, "constexpr") for n in names}
    constexprs = {k: v for k, v in constexprs.items() if k in names}
    try:
        return triton.compile(ASTSource(fn=JITFunction(fn), signature=sig, constexprs=constexprs), target=TARGET,
                              options={"enable_fp_fusion": False, "num_warps": num_warps})  # as launch.py launches them
    except RuntimeError as exc:  # e.g. no ptxas for this platform
        if "ptxas" in str(exc):
            pytest.skip(f"cannot assemble for sm_90 here: {exc}")
        raise


def ptx(fn, signature: dict, constexprs: dict, num_warps: int = 4) -> str:
    return compiled(fn, signature, constexprs, num_warps).asm["ptx"]


GEOMETRY = {"CHUNK": CUDA_BLOCKS.chunk, "BLOCK": CUDA_BLOCKS.block, "SUM_C": CUDA_BLOCKS.sum_c}
COMMON = {"p_chunks": "*i64", "p_rows": "*i64", "p_wd": "*fp64", "p_coef": "*fp64", "p_partials": "*fp64",
          "p_slot_chunks": "*i64", "p_sums": "*fp64", "p_arrivals": "*i32",
          "p_dist": "*fp64", "p_pending": "*i32", "p_scale": "*fp32", "chunk_base": "i64", "u_scale": "fp64",
          "avg_weight": "fp64", "x_scale": "fp64", "u_mult": "fp64"}
PASSES = [
    (passes.norms_kernel, {"UNSCALE": False}),
    (passes.norms_kernel, {"UNSCALE": True}),
    (passes.update_kernel, {"MOMENTUM": False, "RAW_STEP": False, "UNSCALE": False}),
    (passes.update_kernel, {"MOMENTUM": True, "RAW_STEP": False, "UNSCALE": True}),
    (passes.fold_kernel, {"UNSCALE": False}),
    (passes.predict_kernel, {"SCALE_U": True}),
]
VECTOR = {tl.float32: "ld.global.v4.b32", tl.bfloat16: "ld.global.v4.b32", tl.float16: "ld.global.v4.b32",
          tl.float64: "ld.global.v2.b64"}


def _geometry(fn, dtype) -> tuple[dict, int]:
    """The tile constexpr and the warps the pass is launched with for ``dtype``."""
    block, warps = CUDA_BLOCKS.elementwise(dtype.primitive_bitwidth // 8, fold=fn is passes.fold_kernel)
    return {"BLOCK": block}, warps


@pytest.mark.parametrize("dtype", [tl.float32, tl.bfloat16, tl.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("case", range(len(PASSES)), ids=[f"{p[0].__name__}{'-M' if p[1].get('MOMENTUM') else ''}{'-unscale' if p[1].get('UNSCALE') else ''}"
                              for p in PASSES])
def test_passes_fit_their_register_budget(case, dtype):
    """Registers per thread as launched (tile, warps): the fold pass, which keeps four arrays of
    a tile in registers, at most 96 (more would cut the warps an SM can hold below what
    hides memory latency); the other passes at most 128 (float64: 4 warps' worth). Checked
    with triton 3.6 and 3.9 (kernels/NOTES.md has the table)."""
    from tests import dry_launch

    fn, flags = PASSES[case]
    ct = tl.float64 if dtype == tl.float64 else tl.float32
    tile, warps = _geometry(fn, dtype)
    kernel = compiled(fn, COMMON, {"DT": dtype, "CT": ct, **GEOMETRY, **tile, **flags}, warps)
    usage = dry_launch.resource_usage(kernel.asm["cubin"])
    if not usage:
        pytest.skip("cuobjdump is not available to read the cubin")
    assert usage.get("local", 0) == 0 and usage.get("stack", 0) == 0, usage
    assert usage["registers"] <= (96 if fn is passes.fold_kernel else 128), usage


@pytest.mark.parametrize("dtype", [tl.float32, tl.bfloat16, tl.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("case", range(len(PASSES)), ids=[f"{p[0].__name__}{'-M' if p[1].get('MOMENTUM') else ''}{'-unscale' if p[1].get('UNSCALE') else ''}"
                              for p in PASSES])
def test_passes_compile_to_vector_memory_accesses(case, dtype):
    fn, flags = PASSES[case]
    ct = tl.float64 if dtype == tl.float64 else tl.float32
    tile, warps = _geometry(fn, dtype)
    code = ptx(fn, COMMON, {"DT": dtype, "CT": ct, **GEOMETRY, **tile, **flags}, warps)
    # the fold pass over 16-bit parameters: 4 elements per thread, 64-bit accesses (launch.py)
    vector = "ld.global.v2.b32" if fn is passes.fold_kernel and dtype == tl.bfloat16 else VECTOR[dtype]
    assert vector in code, f"{fn.__name__}: no {vector}"
    if fn is not passes.norms_kernel:
        assert vector.replace("ld.", "st.") in code, f"{fn.__name__}: no vector store"
    if dtype == tl.bfloat16 and fn is not passes.norms_kernel:
        assert re.search(r"cvt\.rn\.bf16", code), "bf16 stores must round to nearest even"


@pytest.mark.parametrize("flags, loss_type", [
    ({"MOMENTUM": False, "ADAPTIVE": True, "MEASURE": True, "TAIL": False, "LOSS_VEC": True, "V_PREDICT": True, "FOUND_INF": False}, "*fp32"),
    ({"MOMENTUM": False, "ADAPTIVE": True, "MEASURE": True, "TAIL": False, "LOSS_VEC": True, "V_PREDICT": False, "FOUND_INF": False}, "*bf16"),
    ({"MOMENTUM": False, "ADAPTIVE": False, "MEASURE": True, "TAIL": False, "LOSS_VEC": False, "V_PREDICT": True, "FOUND_INF": True}, "*fp16"),
    ({"MOMENTUM": True, "ADAPTIVE": True, "MEASURE": True, "TAIL": True, "LOSS_VEC": True, "V_PREDICT": False, "FOUND_INF": False}, "*fp64"),
    ({"MOMENTUM": True, "ADAPTIVE": True, "MEASURE": True, "TAIL": True, "LOSS_VEC": False, "V_PREDICT": False, "FOUND_INF": True}, "*fp32"),
    ({"MOMENTUM": True, "ADAPTIVE": False, "MEASURE": False, "TAIL": True, "LOSS_VEC": False, "V_PREDICT": False, "FOUND_INF": False}, "*fp64"),
], ids=["V-vector-predict", "V-bf16-vector", "V-fixed-r-scalar-predict", "M-vector", "M-scalar", "M-settle"])
def test_filter_kernel_compiles_in_float64(flags, loss_type):
    signature = {n: "*fp64" for n in ["p_pxx", "p_pxu", "p_puu", "p_qx", "p_r", "p_lr", "p_wd",
                                     "p_eps", "p_sums", "p_coef", "p_dist", "p_const"]}
    signature.update({"p_loss": loss_type, "p_loss_sq": loss_type})
    signature.update({"p_step": "*i64", "p_skipped": "*i64", "p_below": "*i64", "p_found_inf": "*fp32",
                      "p_slot_chunks": "*i64", "p_pending": "*i32",
                      "n_slots": "i32", "n_dist": "i32", "numel_total": "i64",
                      "n_loss": "i32", "loss_stride": "i32", "v_predicts": "i32"})
    code = ptx(filter_module.filter_kernel, signature, {**flags, "BLOCK_T": CUDA_BLOCKS.block_t,
                                                        "BLOCK_F": CUDA_BLOCKS.block_f})
    assert re.search(r"\.f64", code), "the filter computes in float64"
    assert "sqrt.rn.f64" in code or not flags["MEASURE"] and not flags["TAIL"]
