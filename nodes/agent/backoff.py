"""Jittered timing, so that a fleet of agents never retries in lockstep."""

import random
from collections.abc import Callable
from dataclasses import dataclass, field


def jittered(value: float, spread: float = 0.1, rng: Callable[[], float] = random.random) -> float:
    """Return `value` moved randomly by up to ±`spread` of itself."""
    return value * (1 - spread + 2 * spread * rng())


@dataclass
class Backoff:
    """Exponential backoff with "equal jitter": each delay lies in [d/2, d], d doubling to a cap."""

    base_s: float = 1.0
    cap_s: float = 30.0
    failures: int = 0
    rng: Callable[[], float] = field(default=random.random, repr=False)

    def failure(self, at_least: float = 0.0) -> float:
        """Count a failure and return how long to wait before trying again."""
        delay = min(self.cap_s, self.base_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return max(at_least, delay * (0.5 + self.rng() / 2))

    def success(self) -> None:
        self.failures = 0
