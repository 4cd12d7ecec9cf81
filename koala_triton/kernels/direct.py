"""Direct launches: repeat a compiled kernel's launch without Triton's per-call dispatch.

``JITFunction.run`` does, at every launch, work whose answer only changes when the arguments'
*specialisation* changes: it binds the arguments, specialises each (a tensor by dtype and
16-byte alignment, an integer by value), hashes the result, looks the compiled kernel up,
re-checks the globals the kernel read, and only then calls the compiled kernel's launcher.
Measured without a GPU (``tests/dry_launch.py``, a 2-core VM), that is ~40 µs per launch, about
half the host time of a KOALA-V step on ResNet-18 shapes.

Here the first launch of every distinct *argument key* goes through ``JITFunction.run``, which
returns the compiled kernel; later launches with the same key call its launcher directly with
the arguments in parameter order, exactly as ``run`` would (one cache per device: a compiled
kernel is loaded into one device's context). The key is stricter than Triton's
specialisation, so a key always maps to the kernel ``run`` would pick: each tensor argument
contributes its dtype and whether its address is 16-byte aligned (Triton's pointer
specialisation), every other argument its type and value (Triton specialises integers on their
value; floats and constexprs are keyed by value though Triton needs less). Launch options
(``num_warps``, ...) are part of the key. What ``run`` also re-checks, that the globals a kernel
read are unchanged, holds here by construction (``constants.py``: they are never reassigned).

The launcher is called positionally, so a Triton whose launcher takes other arguments would
read an integer as an address. Direct launches are therefore on only for the Triton versions
in ``CHECKED_VERSIONS``, whose launchers ``tests/test_triton_dry_launch.py`` checked against
``JITFunction.run`` argument for argument; any other version, newer ones included, uses
``JITFunction.run`` for every launch. And a compiled kernel is launched directly only if its
signature lists exactly the kernel's parameters, in order (the arguments handed over).
``KOALA_TRITON_DIRECT_LAUNCH=0`` turns direct launches off everywhere.
"""

from __future__ import annotations

import inspect
import operator
import os

import torch
import triton
from triton.runtime.driver import driver

try:
    from triton import knobs
except ImportError:  # triton < 3.4 has no knobs module: every launch goes through run()
    knobs = None

#: (major, minor) of the Triton releases whose launcher was checked (see the module docstring).
CHECKED_VERSIONS = frozenset({(3, 6), (3, 7), (3, 8), (3, 9)})


def enabled_for(version: str, setting: str | None, has_knobs: bool = True) -> bool:
    """Whether direct launches are used with Triton ``version`` and the environment
    ``setting`` of ``KOALA_TRITON_DIRECT_LAUNCH`` (None when unset)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return has_knobs and setting != "0" and (major, minor) in CHECKED_VERSIONS


ENABLED = enabled_for(triton.__version__, os.environ.get("KOALA_TRITON_DIRECT_LAUNCH"), knobs is not None)
_MAX_KEYS = 64  # per kernel; steady training reuses a handful

#: Launches since import: through ``JITFunction.run`` ("dispatched") and direct ("direct").
STATS = {"dispatched": 0, "direct": 0}

_arguments: dict[int, object] = {}
_names: dict[int, list[str]] = {}
_compiled: dict[tuple[int, int], dict] = {}  # (kernel, device) -> key -> compiled kernel
_tensor = torch.Tensor


def _argument_getter(fn):
    """kwargs -> the kernel's arguments in parameter order (defaults filled in)."""
    getter = _arguments.get(id(fn))
    if getter is None:
        params = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
        if all(default is inspect.Parameter.empty for _, default in params):
            getter = operator.itemgetter(*(name for name, _ in params))
        else:
            def getter(kwargs, params=params):
                return [kwargs[name] if name in kwargs else default for name, default in params]
        _arguments[id(fn)] = getter
    return getter


def argument_key(kwargs: dict) -> tuple:
    """The launch's key (see the module docstring): the argument names, then per argument
    (dtype, 16-byte aligned) for a tensor, (type, value) for anything else."""
    parts = [tuple(kwargs)]
    append = parts.append
    for value in kwargs.values():
        if isinstance(value, _tensor):
            append(value.dtype)
            append(value.data_ptr() & 15 == 0)
        else:
            append(value.__class__)
            append(value)
    return tuple(parts)


def usable(compiled, fn) -> bool:
    """A compiled kernel may be launched directly: it has the launcher's attributes, and its
    signature (what its launcher was generated from) is exactly ``fn``'s parameters in order,
    the arguments a direct launch hands over."""
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
        return False
    signature = getattr(getattr(compiled, "src", None), "signature", None)
    return isinstance(signature, dict) and list(signature) == _parameter_names(fn)


def _parameter_names(fn) -> list[str]:
    names = _names.get(id(fn))
    if names is None:
        names = list(inspect.signature(fn).parameters)
        _names[id(fn)] = names
    return names


def launch(fn, jit, grid: tuple[int, ...], kwargs: dict) -> None:
    """Launch ``jit`` (the ``JITFunction`` of ``fn``) on ``grid`` with keyword arguments
    ``kwargs`` (kernel parameters and launch options)."""
    if not ENABLED:
        STATS["dispatched"] += 1
        jit[grid](**kwargs)
        return
    key = argument_key(kwargs)
    device = driver.active.get_current_device()
    # a compiled kernel is loaded into one device's context: one cache per device
    per_kernel = _compiled.setdefault((id(fn), device), {})
    try:
        compiled = per_kernel.get(key)
    except TypeError:  # an unhashable argument: no direct launch for it
        STATS["dispatched"] += 1
        jit[grid](**kwargs)
        return
    if compiled is None:
        STATS["dispatched"] += 1
        compiled = jit[grid](**kwargs)
        if compiled is not None and usable(compiled, fn):
            if len(per_kernel) >= _MAX_KEYS:
                per_kernel.clear()
            per_kernel[key] = compiled
        return
    STATS["direct"] += 1
    args = _argument_getter(fn)(kwargs)
    stream = driver.active.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    metadata = compiled.launch_metadata(grid, stream, *args)
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, metadata,
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)


def clear() -> None:
    """Forget every compiled kernel (tests that swap Triton's driver call this)."""
    _compiled.clear()
