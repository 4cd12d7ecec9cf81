"""Dry launches: the CUDA launch path of the Triton kernels, run on a machine without a GPU.

``dry_cuda()`` installs a stand-in for Triton's CUDA driver that reports an sm_90 device (an
H100/H200) and hands every compiled kernel a recording launcher instead of the driver's. Then
``JITFunction.run`` does on CPU tensors exactly what it does on a GPU: binds the arguments,
specialises them (alignment, integer divisibility), looks the kernel up in its cache or
compiles it through PTX to a cubin with ptxas, and calls the launcher with the grid and the
packed arguments. Only the launcher's own C call (cuLaunchKernel) is missing, so nothing
executes: weights do not change.

What this checks and measures without a GPU: that every launch an optimizer step makes binds
and compiles for the real target with the arguments it really passes, how many distinct
compilations a training loop triggers, the compiled kernels' resources (registers, spills,
shared memory from the cubin), and the host time of a step including Triton's dispatch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

triton = __import__("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver as _driver_config  # noqa: E402

from koala_triton import _triton_backend  # noqa: E402
from koala_triton.kernels import direct as _direct  # noqa: E402
from koala_triton.kernels import launch as _launch  # noqa: E402

#: An H100/H200 as the compiler sees it.
TARGET = GPUTarget("cuda", 90, 32)
#: sm_90's limits, as the real driver would report them.
_PROPERTIES = {"max_shared_mem": 232448, "max_num_regs": 65536, "multiprocessor_count": 132,
               "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


@dataclass
class Launch:
    kernel: str
    compiled: str  # the compiled variant's hash
    grid: tuple[int, int, int]
    args: tuple


@dataclass
class Recorder:
    """What the dry driver saw: launches in order, and the kernels it loaded."""

    launches: list[Launch] = field(default_factory=list)
    loaded: dict = field(default_factory=dict)  # kernel name -> [cubin bytes, ...]
    #: kernel name -> [signature of each compiled variant: parameter -> Triton type, e.g. "fp64"]
    signatures: dict = field(default_factory=dict)


class _Utils:
    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def get_device_properties(self, device):
        return dict(_PROPERTIES)

    def unload_module(self, module):
        pass

    def load_binary(self, name, kernel, shared, device):
        self.recorder.loaded.setdefault(name, []).append(kernel)
        # (module, function, n_regs, n_spills, n_max_threads): registers and spills are read
        # from the cubin by ``resource_usage`` instead
        return 1, 1, 0, 0, 1024


class DryCudaDriver:
    """The parts of Triton's CUDA driver that compiling and launching use."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.utils = _Utils(recorder)
        self.device = 0

    @classmethod
    def is_active(cls):
        return True

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        self.device = device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_device_capability(self, device=0):
        return (TARGET.arch // 10, TARGET.arch % 10)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def launcher_cls(self, src, metadata):
        name, variant = getattr(metadata, "name", "?"), getattr(metadata, "hash", "?")
        recorder = self.recorder
        recorder.signatures.setdefault(name, []).append(dict(getattr(src, "signature", {})))

        def launcher(g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
            recorder.launches.append(Launch(name, variant, (g0, g1, g2), args))

        return launcher


def _launch_dry(fn, grid, device, **kwargs) -> None:
    """``kernels.launch.launch`` with the CUDA branch taken for CPU tensors."""
    _launch.LAUNCHES["count"] += 1
    _launch.launch_compiled(fn, grid, **kwargs)


def unavailable_reason() -> str | None:
    """Why dry launches cannot run in this process, or None.

    Triton's own helper kernels (``tl.standard``) are decorated once, when triton is imported:
    in a process started with ``TRITON_INTERPRET=1`` they are interpreter functions, which a
    compiled kernel cannot call."""
    from triton.runtime.jit import JITFunction
    import triton.language as tl

    if not isinstance(tl.standard._sum_combine, JITFunction):
        return "triton was imported with TRITON_INTERPRET=1 set: its helpers cannot be compiled in this process"
    return None


@contextlib.contextmanager
def dry_cuda(monkeypatch):
    """Within the block, fused=True optimizers on CPU tensors launch through the CUDA path,
    with CUDA block sizes, into a ``Recorder`` (yielded). Needs ``TRITON_INTERPRET=1`` set
    (only so that ``fused=True`` accepts CPU tensors: the interpreter is not used)."""
    recorder = Recorder()
    monkeypatch.setattr(_triton_backend, "launch", _launch_dry)
    monkeypatch.setattr(_triton_backend, "blocks_for", lambda device: _launch.CUDA_BLOCKS)
    # a private kernel cache: JITFunctions made under the dry driver stay with it
    wrapped: dict = {}
    monkeypatch.setattr(_launch, "_wrapped", wrapped)
    previous = _driver_config._active  # None where no GPU driver was ever made active
    _driver_config.set_active(DryCudaDriver(recorder))
    _direct.clear()  # kernels compiled under another driver are not this one's
    try:
        yield recorder
    finally:
        _direct.clear()
        # Compiled kernels unload their module through the active driver when collected:
        # mark them unloaded while the dry driver is still the active one.
        for jit in wrapped.values():
            for caches in getattr(jit, "device_caches", {}).values():
                for compiled in caches[0].values():
                    compiled.module = None
        _driver_config._active = previous


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, spill stores/loads and static shared memory of a cubin's one kernel, read with
    the cuobjdump that ships with Triton (empty dict when it is not available)."""
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                                     "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key, name in (("REG", "registers"), ("STACK", "stack"), ("SHARED", "shared"), ("LOCAL", "local")):
        for token in out.replace(",", " ").split():
            if token.startswith(key + ":"):
                usage[name] = int(token.split(":")[1])
    return usage
