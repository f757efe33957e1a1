"""What each streaming pass of a preparation cost: rows, seconds and the process's peak memory so far."""

from __future__ import annotations

import resource
from dataclasses import dataclass


@dataclass(frozen=True)
class PassStats:
    phase: str
    rows: int
    seconds: float
    peak_rss_mb: float  # the process's peak resident set size so far


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
