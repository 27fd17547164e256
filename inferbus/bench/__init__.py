"""``inferbus bench``: load generation measured the way Triton's perf_analyzer measures.

Closed loop (``concurrency``: N callers, each sending its next request when the last returns)
or open loop (``request_rates``: requests sent on a constant or Poisson schedule whatever the
replies do). Each level warms up, then measures windows until three in a row agree within
``stability`` (throughput and p50), and reads the workers' $SRV.STATS over those windows.
"""

from inferbus.bench.inputs import inputs_from_file, inputs_from_signature
from inferbus.bench.runner import BenchConfig, LevelResult, run_bench

__all__ = [
    "BenchConfig",
    "LevelResult",
    "inputs_from_file",
    "inputs_from_signature",
    "run_bench",
]
