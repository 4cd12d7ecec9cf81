"""What the kernels read as globals: compile-time integers, the table columns, and reduction
combine functions; and the ``triton_kernel`` marker.

Triton checks, at every launch, that each global a kernel read when it was compiled still has
its value (``JITFunction.run``: ``globals_dict[name] != saved_copy``). For a ``tl.constexpr``
that comparison builds new constexpr objects (about 3 µs each on a 2-core VM; a kernel here
reads up to 9 globals, so it was a third of Triton's dispatch time). ``constant`` compares as
plain integers. Inside kernels it behaves as any ``tl.constexpr`` (these constants only enter
arithmetic and hints there; none is compared).
"""

from __future__ import annotations

import triton.language as tl


class constant(tl.constexpr):  # noqa: N801 (reads like tl.constexpr at the definitions)
    def __eq__(self, other):
        return type(other) is type(self) and other.value == self.value

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(self.value)


# Reductions through tl.reduce with triton's own combine functions instead of tl.sum/tl.max
# (and tl.full instead of tl.zeros): those helpers are @jit functions, and every call of one
# inside an interpreted kernel costs milliseconds; the interpreter maps these two combine
# functions to numpy directly. Compiled, the result is the same code as tl.sum/tl.max.
SUM = tl.standard._sum_combine
MAX = tl.standard._elementwise_max


#: Columns of a table row (``tables.py`` writes them, the passes read them): the addresses of
#: the weights x, gradient g, velocity u and weight average xavg, the element count and the
#: slot; padded to 8 (a row is 64 bytes).
COL_X = constant(0)
COL_G = constant(1)
COL_U = constant(2)
COL_A = constant(3)
COL_NUMEL = constant(4)
COL_SLOT = constant(5)
NCOL = constant(8)

#: Address alignment the host guarantees (bytes); see ``tables.prepare``.
ALIGN = constant(16)


def triton_kernel(fn):
    """Marks a plain function as a Triton kernel (``launch.py`` compiles or interprets it per
    device, so kernels are not ``@triton.jit``-decorated at import). Returns ``fn`` itself."""
    fn.is_triton_kernel = True
    return fn
