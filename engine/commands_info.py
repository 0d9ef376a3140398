"""`hotcold info`: what the kernels chose on this machine, and why (the calibration's own timings)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recalibrate", action="store_true", help="measure again instead of reading the cache")


def run(args: argparse.Namespace) -> int:
    from hotcold.kernels import calibrate, native

    if args.recalibrate:
        calibrate.forget()
    cal = calibrate.current()
    flags = sorted(f for f in native.cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "vnni")))
    print(f"CPU: {native.cpu_model()}")
    print(f"flags: {' '.join(flags) or '-'}")
    print(f"ISA levels this CPU runs: {', '.join(native.available_isas())}; chosen: {cal.isa} "
          f"(HOTCOLD_ISA forces one)")
    print(f"threads: {cal.threads} (HOTCOLD_THREADS or --threads)")
    print(f"native library: {'built' if native.load() is not None else 'unavailable: torch paths only'}")
    print(cal.summary())
    if cal.seconds:
        print(f"\nmicroseconds per product of a {calibrate.SHAPE[0]}x{calibrate.SHAPE[1]} matrix, by tokens:")
        print(f"{'weights':10s} {'path':7s} " + " ".join(f"{t:>8d}" for t in calibrate.TOKENS))
        for kind, paths in cal.seconds.items():
            for path, secs in paths.items():
                print(f"{kind:10s} {path:7s} " + " ".join(f"{s * 1e6:8.0f}" for s in secs))
    return 0
