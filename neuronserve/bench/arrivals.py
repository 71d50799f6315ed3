"""When requests are sent: open-loop arrival processes.

Intervals between arrivals are gamma-distributed with shape ``burstiness`` and mean
``1 / request_rate``: burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular
(vLLM ``bench serve``'s definition).
"""

from __future__ import annotations

import math
import random


def arrival_times(
    num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Seconds after the start at which each request is sent (all 0 for an infinite rate)."""
    if request_rate <= 0:
        raise ValueError(f"request_rate: must be > 0 (or inf), got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness: must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)
    t, times = 0.0, []
    for _ in range(num_requests):
        times.append(t)
        t += rng.gammavariate(burstiness, scale)
    return times
