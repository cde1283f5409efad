"""The fleet simulator's judge: each ratio taken per seed and averaged geometrically, against the
oracle, the better of round-robin and least-loaded, the best peer of each seed, and each peer on
its own (of which the closest to kv-extproc is named)."""

from __future__ import annotations

import re

from bench.fleet import PEERS, judge


def row(policy: str, seed: int, mean: float, p99: float, workload: str = "bursts", rate: str = "busy") -> dict:
    return {"workload": workload, "rate": rate, "policy": policy, "seed": seed, "ttft_mean_ms": mean, "ttft_p99_ms": p99}


def figures(line: str) -> dict[str, float]:
    return {f"{stat} {what.strip()}": float(value)
            for stat, value, what in re.findall(r"(mean|p99) ([\d.]+)x ([^,(]+(?:\([a-z-]+\))?)", line)}


def fleet(seed: int, ours: float, peers: dict[str, float]) -> list[dict]:
    rows = [row("kv-extproc", seed, ours, 2 * ours), row("queue-cache-oracle", seed, ours, 2 * ours),
            row("round-robin", seed, 4 * ours, 8 * ours), row("least-loaded", seed, 4 * ours, 8 * ours)]
    return rows + [row(peer, seed, value, 2 * value) for peer, value in peers.items()]


def test_each_peer_is_compared_over_the_seeds_and_the_closest_is_named():
    # Seed 1: dynamo is the best peer (ours 1.25x it); seed 2: aibrix is (ours 1.25x it).
    # Per seed the best peer beats us both times, but against either peer over both seeds
    # kv-extproc is 1.25 x 0.8 = 1.0x: the stricter figure and the target's own differ.
    rows = fleet(1, 100.0, {"sglang": 400.0, "llm-d": 400.0, "dynamo": 80.0, "aibrix": 125.0})
    rows += fleet(2, 100.0, {"sglang": 400.0, "llm-d": 400.0, "dynamo": 125.0, "aibrix": 80.0})
    [line] = judge(rows)
    got = figures(line)
    assert got["mean best peer"] == got["p99 best peer"] == 1.25
    assert got["mean oracle"] == got["mean best of rr/ll"] * 4 == 1.0
    closest = [key for key in got if key.startswith("mean") and "closest peer" in key]
    assert len(closest) == 1 and got[closest[0]] == 1.0
    assert closest[0].endswith(("(dynamo)", "(aibrix)"))
    assert "(2 seeds)" in line


def test_a_peer_that_beats_us_on_average_is_the_one_named():
    rows = fleet(1, 100.0, {"sglang": 90.0, "llm-d": 400.0, "dynamo": 120.0, "aibrix": 200.0})
    rows += fleet(2, 100.0, {"sglang": 95.0, "llm-d": 400.0, "dynamo": 105.0, "aibrix": 200.0})
    [line] = judge(rows)
    got = figures(line)
    assert round(got["p99 the closest peer (sglang)"], 2) == round((100 / 90 * 100 / 95) ** 0.5, 2)
    assert set(PEERS) >= {"sglang", "dynamo", "aibrix", "llm-d"}


def test_unshared_traffic_is_not_judged_against_the_peers():
    rows = fleet(1, 100.0, {"sglang": 50.0, "llm-d": 50.0, "dynamo": 50.0, "aibrix": 50.0})
    rows = [dict(r, workload="unshared") for r in rows]
    [line] = judge(rows)
    assert "peer" not in line and "1.00x oracle" in line
