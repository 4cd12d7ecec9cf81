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
    _print_koala_pp()

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


def _print_koala_pp() -> None:
    from .kpp_derive import derive_pp
    from .paper import PP_PAPER, PP_SOURCES

    print(f"{PP_PAPER}: one filter per tensor carrying v_k = H_k P_{{k-1}}")
    print("symbols: HH = H_k·H_k, Hh = H_k·h, Hv = H_k·v_{k-1} (the step's three new dot products); "
          "hh = ‖h‖², hv = h·v_{k-1}, S0 = S_{k-1} (stored by the last step); h = H_{k-1}\n")
    for estimate in ("symmetric", "plain"):
        d = derive_pp(estimate)
        print(f"KOALA++, {estimate} estimate")
        for stage, forms in d.stages().items():
            for label, line in zip((f"[{stage}]", *[""] * 2), PP_SOURCES[stage]):
                print(f"  {label:16}<- {line}")
            for name, expr in forms.items():
                print(f"    {name:28} = {expr}")
        print()


if __name__ == "__main__":
    sys.exit(main())
