"""Thread pools that stay fast on a busy machine (set before torch is imported).

torch's OpenMP threads (and numba's) spin while they wait for work. When other processes hold
the cores, a spinning thread burns the time slice its partner needs, and every parallel region
waits for a descheduled thread: on this project's 2-core machine under a load average of about
13, the quick demo trained at 18 img/s with spinning threads and 85 img/s with sleeping ones
(benchmarks/speed/thread_pools.py, docs/BENCHMARKS.md).
"""
from __future__ import annotations

import os
import sys

__all__ = ["quiet_thread_pools"]


def quiet_thread_pools() -> None:
    """Make idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose a
    policy; OpenMP reads it once, when torch loads, so this only acts before ``import torch``."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
