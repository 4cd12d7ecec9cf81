"""Compile and dry-launch recorded kernel specialisations for sm_90 (run by ``compiled_typing``).

``python -m tests.compile_keys KEYS.json RESULT.json``: KEYS.json is a list of
``{"key": <compile key json>, "test": <node id>}`` written by the ``tests.compiled_typing``
plugin. Each key is turned back into launch arguments of the same specialisation (tensors of
the recorded dtype and alignment, integers of the recorded class, floats, constexpr values) and
launched through ``kernels.launch.launch_compiled`` under the dry sm_90 driver
(``tests/dry_launch.py``): Triton binds, specialises, compiles to a cubin and calls the
recording launcher; nothing executes. RESULT.json: ``{"checked": n, "failures": [...],
"skipped": reason or null}``. Must run in a process where triton was imported without
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback

import pytest
import torch
import triton.language as tl

#: One integer per class Triton tells apart: (type, divisible by 16).
_INTS = {("i32", True): 32, ("i32", False): 3, ("i64", True): 2**33, ("i64", False): 2**33 + 1}


def _tensor(dtype_name: str, aligned: bool) -> torch.Tensor:
    dtype = getattr(torch, dtype_name)
    if aligned:
        return torch.zeros(8, dtype=dtype)  # CPU allocations are at least 16-byte aligned
    return torch.zeros(9, dtype=dtype)[1:]  # one element in: not 16-byte aligned


def arguments(args: dict) -> dict:
    """Launch keyword arguments of the specialisation ``args`` (see ``compiled_typing``)."""
    out = {}
    for name, spec in args.items():
        kind = spec[0]
        if kind == "tensor":
            out[name] = _tensor(spec[1], spec[2])
        elif kind == "int":
            out[name] = 1 if spec[1] == "one" else _INTS[(spec[1], spec[2])]
        elif kind == "float":
            out[name] = 0.5
        elif kind == "bool":
            out[name] = spec[1]
        elif kind == "dtype":
            out[name] = tl.dtype(spec[1])
        else:
            out[name] = spec[1]
    return out


def check(entries: list[dict]) -> dict:
    from tests import dry_launch
    from koala_triton.kernels.launch import launch_compiled

    reason = dry_launch.unavailable_reason()
    if reason is not None:
        return {"checked": 0, "failures": [], "skipped": reason}
    failures = []
    with pytest.MonkeyPatch.context() as mp, dry_launch.dry_cuda(mp) as recorder:
        for entry in entries:
            key = json.loads(entry["key"])
            fn = getattr(importlib.import_module(key["module"]), key["kernel"])
            try:
                before = len(recorder.launches)
                launch_compiled(fn, (1,), **arguments(key["args"]))
                if len(recorder.launches) != before + 1:
                    raise RuntimeError("the launch did not reach the launcher")
            except Exception as exc:  # noqa: BLE001 (every failure is reported, not raised)
                text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                if "ptxas" in text and not failures and entry is entries[0]:
                    return {"checked": 0, "failures": [], "skipped": f"cannot assemble for sm_90 here: {text[:300]}"}
                failures.append({"key": entry["key"], "test": entry["test"], "error": text[-1500:]})
    return {"checked": len(entries), "failures": failures, "skipped": None}


def main(argv: list[str]) -> int:
    keys_file, result_file = argv
    with open(keys_file) as f:
        entries = json.load(f)
    result = check(entries)
    with open(result_file, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
