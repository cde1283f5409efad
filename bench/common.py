"""Helpers shared by the benchmarks: prompts, percentiles, result files."""

from __future__ import annotations

import json
import random
import statistics
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
