"""pytest plugin: interpreted Triton kernels see what compiled Triton sees.

On by default (``pyproject.toml``: ``addopts = -p tests.compiled_typing``); ``-p
no:tests.compiled_typing`` turns it off. Two jobs, for every kernel launch that runs in Triton's
CPU interpreter during the session (``koala_triton.kernels.launch.launch`` on CPU tensors):

1. **Compiled argument typing.** The interpreter runs kernels with Python semantics, where
   compiled Triton types arguments from their values. Here the launch's arguments are typed as
   the compiler would type them before the interpreter sees them:

   - a Python float becomes a float32 scalar (compiled Triton passes it as ``fp32``), or a
     float64 one where the parameter is declared ``tl.float64``;
   - an integer equal to 1, for a parameter without a type declaration, becomes a
     ``tl.constexpr`` (compiled Triton specialises it into the kernel, where it has no
     ``.to()`` and no tensor methods).

   A kernel that relies on the interpreter's exact doubles or on an ``int`` being a tensor
   then fails or drifts here, as it would on a GPU.

2. **The specialisations reached compile for sm_90.** Each launch's *compile key* is recorded:
   per argument, what Triton specialises on (a tensor's dtype and 16-byte alignment; an
   integer's type, whether it is 1, whether it is divisible by 16; a float's declared type; a
   constexpr's value), with the interpreter's small block sizes replaced by the CUDA ones
   (``kernels/launch.py``), as a GPU run of the same step would launch it. At the end of the
   session every distinct key is compiled for sm_90 and launched through the dry driver of
   ``tests/dry_launch.py`` (nothing executes), in a fresh process without ``TRITON_INTERPRET``
   (a process that imported triton with it set cannot compile). A key that fails to compile
   or launch fails the session, with the kernel, the key and the error in the summary.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

#: Launch keyword arguments that are block geometry: interpreter values -> the CUDA ones.
_GEOMETRY = {"BLOCK": "block", "CHUNK": "chunk", "BLOCK_T": "block_t", "BLOCK_F": "block_f",
             "SUM_C": "sum_c", "num_warps": "num_warps"}


class _State:
    original_kernel = None
    keys: dict = {}  # compile key (json text) -> first test that reached it


def _declared(fn) -> dict[str, str]:
    """Parameter name -> its declared type as Triton normalises it ("fp64", "constexpr", ...;
    "" where none is declared)."""
    from triton.runtime.jit import _normalize_ty

    out = {}
    for name, param in inspect.signature(fn).parameters.items():
        empty = param.annotation is inspect.Parameter.empty or not param.annotation
        out[name] = "" if empty else _normalize_ty(param.annotation)
    return out


# ------------------------------------------------------------------ 1. compiled typing
def _scalar(value: float, declared: str):
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    dtype, np_dtype = (tl.float64, np.float64) if declared == "fp64" else (tl.float32, np.float32)
    return tl.tensor(TensorHandle(np.array([value], dtype=np_dtype), dtype), dtype)


def typed_as_compiled(fn, kwargs: dict) -> dict:
    """``kwargs`` with Python floats and unit integers typed as compiled Triton types them."""
    import triton.language as tl

    declared = _declared(fn)
    out = {}
    for name, value in kwargs.items():
        kind = declared.get(name, "")
        if kind == "constexpr" or name not in declared:
            out[name] = value
        elif isinstance(value, float):
            out[name] = _scalar(value, kind)
        elif isinstance(value, int) and not isinstance(value, bool) and value == 1 and not kind:
            out[name] = tl.constexpr(1)
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------ 2. compile keys
def _int_class(value: int) -> list:
    if value == 1:
        return ["one"]
    width = "i32" if -2**31 <= value < 2**31 else "i64"
    return [width, value % 16 == 0]


def compile_key(fn, kwargs: dict) -> str:
    """What compiled Triton would specialise this launch on, with CUDA block geometry (json)."""
    import torch
    from koala_triton.kernels.launch import CUDA_BLOCKS

    declared = _declared(fn)
    args = {}
    for name, value in kwargs.items():
        if name in ("BLOCK", "num_warps") and "DT" in kwargs:  # the CUDA tile and warps of the dtype
            geometry = CUDA_BLOCKS.elementwise(kwargs["DT"].primitive_bitwidth // 8, fold=fn.__name__ == "fold_kernel")
            args[name] = ["value", geometry[0] if name == "BLOCK" else geometry[1]]
        elif name in _GEOMETRY:
            args[name] = ["value", getattr(CUDA_BLOCKS, _GEOMETRY[name])]
        elif isinstance(value, torch.Tensor):
            args[name] = ["tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0]
        elif declared.get(name) == "constexpr" or name not in declared:
            args[name] = ["dtype", value.name] if hasattr(value, "name") and hasattr(value, "primitive_bitwidth") \
                else ["value", value]
        elif isinstance(value, bool):
            args[name] = ["bool", value]
        elif isinstance(value, int):
            args[name] = ["int", *_int_class(value)]
        elif isinstance(value, float):
            args[name] = ["float", declared.get(name) or "fp32"]
        else:
            args[name] = ["value", repr(value)]
    return json.dumps({"module": fn.__module__, "kernel": fn.__name__, "args": args}, sort_keys=True)


class _Interpreted:
    """An interpreted kernel whose launches are typed and recorded (see the module docstring)."""

    def __init__(self, fn, interpreted, nodeid):
        self.fn, self.interpreted, self.nodeid = fn, interpreted, nodeid

    def __getitem__(self, grid):
        def run(**kwargs):
            key = compile_key(self.fn, kwargs)
            _State.keys.setdefault(key, self.nodeid())
            return self.interpreted[grid](**typed_as_compiled(self.fn, kwargs))
        return run


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]


def _kernel_for(fn, device):
    k = _State.original_kernel(fn, device)
    if device.type == "cuda":
        return k
    return _Interpreted(fn, k, _current_test)


# ------------------------------------------------------------------ pytest hooks
def pytest_configure(config):
    try:
        from koala_triton.kernels import launch
    except ImportError:  # no triton: nothing is interpreted
        return
    _State.original_kernel = launch.kernel
    _State.keys = {}
    launch.kernel = _kernel_for


def pytest_unconfigure(config):
    if _State.original_kernel is not None:
        from koala_triton.kernels import launch

        launch.kernel = _State.original_kernel
        _State.original_kernel = None


@dataclasses.dataclass
class _Outcome:
    checked: int = 0
    failures: list = dataclasses.field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0


_OUTCOME: _Outcome | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    global _OUTCOME
    if not _State.keys:
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = os.path.join(tmp, "keys.json")
        out_file = os.path.join(tmp, "result.json")
        with open(keys_file, "w") as f:
            json.dump([{"key": k, "test": t} for k, t in _State.keys.items()], f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "tests.compile_keys", keys_file, out_file],
                              env=env, capture_output=True, text=True, cwd=str(session.config.rootpath))
        if proc.returncode != 0 or not os.path.exists(out_file):
            result = {"checked": 0, "skipped": None,
                      "failures": [{"key": "(the checking process)", "test": "-",
                                    "error": (proc.stdout + proc.stderr)[-4000:]}]}
        else:
            with open(out_file) as f:
                result = json.load(f)
    _OUTCOME = _Outcome(checked=result["checked"], failures=result["failures"], skipped=result["skipped"],
                        seconds=time.perf_counter() - t0)
    if _OUTCOME.failures and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    outcome = _OUTCOME
    if outcome is None:
        return
    tr = terminalreporter
    if outcome.skipped:
        tr.write_sep("-", f"compiled typing: sm_90 compile check of interpreted launches skipped: {outcome.skipped}")
        return
    if outcome.failures:
        tr.write_sep("=", f"compiled typing: {len(outcome.failures)} of {outcome.checked} interpreted kernel "
                          "specialisations FAIL to compile or launch for sm_90", red=True)
        for failure in outcome.failures[:20]:
            tr.write_line(f"first reached by {failure['test']}\n  key: {failure['key']}\n  {failure['error']}")
    else:
        tr.write_sep("-", f"compiled typing: {outcome.checked} interpreted kernel specialisations compile and "
                          f"launch for sm_90 (dry driver, {outcome.seconds:.0f} s)")


# ------------------------------------------------------------------ other processes
def record_in_this_process() -> dict:
    """Outside pytest (a spawned rank of a distributed test): type this process's interpreted
    launches as compiled Triton does and record their compile keys. Returns the dict of keys it
    fills; hand it to ``add_keys`` in the pytest process."""
    from koala_triton.kernels import launch

    if _State.original_kernel is None:
        _State.original_kernel = launch.kernel
        launch.kernel = _kernel_for
    return _State.keys


def add_keys(keys: dict) -> None:
    """Compile keys reached in another process: checked for sm_90 at the end of the session like
    this process's own."""
    for key, test in keys.items():
        _State.keys.setdefault(key, test)
