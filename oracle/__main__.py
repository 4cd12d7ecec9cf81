"""``python -m oracle``: print the derived closed forms and every certificate; exit 0 iff all hold.

The forms are grouped by EKF stage; each group is headed by the lines of the KOALA paper it
comes from (:mod:`oracle.paper`).
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    start = time.perf_counter()
    from .certificates import all_checks
    from .derive import derive_riccati, derive_m, derive_v
    from .paper import PAPER, RICCATI_SOURCE, TABLE_1, sources

    print("KOALA closed forms derived from the generic EKF (oracle/ekf.py)")
    print("symbols: ph = p^, G = ‖g~‖², X2 = ‖x^‖², Lt = L~ = h(x^), Pxx_h.. = P^ block, "
          "det_h = det P^\n")
    print(f"paper: {PAPER}; its Table 1 (the EKF):")
    for line in TABLE_1:
        print(f"    {line}")
    print()
    for d in (derive_v(), derive_m()):
        print(f"KOALA-{d.variant}  (assumptions: {d.assumptions})")
        for stage, forms in d.stages().items():
            for label, line in zip((f"[{stage}]", *[""] * 2), sources(d.variant, stage)):
                print(f"  {label:16}<- {line}")
            for name, expr in forms.items():
                print(f"    {name:28} = {expr}")
        print()
    print(f"KOALA-V Riccati fixed point  p* = {derive_riccati().fixed_point}")
    print(f"  <- {RICCATI_SOURCE}\n")

    failed = 0
    total = 0
    for title, checks in all_checks():
        print(f"[{title}]")
        for check in checks:
            total += 1
            failed += not check.holds
            print("  " + check.line())
    elapsed = time.perf_counter() - start
    verdict = "ALL HOLD" if not failed else f"{failed} FAILED"
    print(f"\n{total} certificates, {verdict} ({elapsed:.1f} s)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
