"""What the benchmarks share: the machine's name for RESULTS.md and a median timer."""
from __future__ import annotations

import platform
import statistics
import subprocess
import time


def cpu_name() -> str:
    """The CPU model and its core count as lscpu reports them (the machine line of bench/RESULTS.md)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    info = dict((k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line))
    return f"{info.get('Model name', platform.processor() or '?')}, {info.get('CPU(s)', '?')} CPUs"


def timeit(fn, repeat: int) -> float:
    """Median wall time of ``repeat`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
