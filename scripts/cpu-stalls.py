#!/usr/bin/env python3
"""How often this machine takes a CPU away from a busy process: spins SECONDS on every CPU at
once and reports the gaps longer than 0.5 ms between two clock reads (hypervisor steal,
interrupts, other tenants). A scrape that meets such a gap is slower by its length, whatever
the agent does, so latency tails below the worst gap are not measurable on this machine."""
import multiprocessing
import os
import sys
import time

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0


def spin(_):
    end = time.perf_counter() + SECONDS
    last = time.perf_counter()
    gaps, lost, worst = 0, 0.0, 0.0
    while True:
        now = time.perf_counter()
        if now > end:
            return gaps, lost, worst
        gap = now - last
        if gap > 0.0005:
            gaps, lost = gaps + 1, lost + gap
        worst, last = max(worst, gap), now


if __name__ == "__main__":
    cpus = os.cpu_count() or 1
    with multiprocessing.Pool(cpus) as pool:
        results = pool.map(spin, range(cpus))
    gaps = sum(r[0] for r in results)
    lost = sum(r[1] for r in results) / cpus / SECONDS * 100
    worst = max(r[2] for r in results) * 1000
    print(f"CPU stalls over {SECONDS:g} s on {cpus} CPUs: {gaps / cpus / SECONDS:.1f} gaps > 0.5 ms "
          f"per CPU-second, {lost:.2f} % of the time lost, longest {worst:.2f} ms")
