"""Helpers shared by the benchmarks: prompts, percentiles, result files."""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

_WORDS = ("cache prefix router engine token block policy tenant latency queue the of answers carefully "
          "with sources never invent facts and a to is in for on that by this be are").split()


def text_of_tokens(tokenizer, target_tokens: int, seed: int) -> str:
    """Deterministic prose of about ``target_tokens`` tokens for this tokenizer."""
    rng = random.Random(seed)
    words = [rng.choice(_WORDS) for _ in range(target_tokens)]
    lo, hi = 1, len(words)
    while lo < hi:  # shortest word count reaching the target
        mid = (lo + hi) // 2
        if len(tokenizer(" ".join(words[:mid]))["input_ids"]) >= target_tokens:
            hi = mid
        else:
            lo = mid + 1
    return " ".join(words[:lo])


class Pace:
    """How fast this machine runs plain Python now, against the fastest seen in this run: a
    fixed loop of dict updates (~1 ms), timed. Here the same loop takes 1.4x as long or more for
    tenths of a second at a time (a VM sharing its host), and a benchmark held to an absolute
    figure can then tell which of its samples the machine ran at its steady pace."""

    SLOW = 1.15
    """A pace this much slower than the fastest seen is a slow phase."""

    def __init__(self) -> None:
        self.best = float("inf")

    def now(self) -> float:
        t0 = time.perf_counter()
        counts: dict[int, int] = {}
        for i in range(10_000):
            counts[i % 1000] = counts.get(i % 1000, 0) + i
        seconds = time.perf_counter() - t0
        self.best = min(self.best, seconds)
        return seconds

    def steady(self, seconds: float) -> bool:
        return seconds <= self.SLOW * self.best


def summary(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "n": len(ordered),
        "p50_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
    }


def write(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
