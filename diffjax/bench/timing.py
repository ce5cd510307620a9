"""Timing helpers shared by the benchmarks: interleaved rounds of blocking closures."""

import time
from collections.abc import Callable


def timed(step: Callable[[], None]) -> float:
    """Seconds one call of `step` takes; `step` must return only when its work is done."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run_alternating(steps: dict[str, Callable[[], None]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Warm every step up, then time them in interleaved rounds so that a noisy machine slows all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds[name].append(timed(step))
    return seconds
