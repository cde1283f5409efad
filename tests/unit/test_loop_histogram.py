"""LoopHistogram, the lock-free histogram every decision observes, exports exactly what
prometheus_client's own Histogram exports for the same observations."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc.metrics import LoopHistogram, Metrics

BUCKETS = (0.0, 0.0001, 0.001, 0.01, 0.1, 1.0)


def samples(registry: CollectorRegistry, name: str) -> dict:
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families if family.name == name for s in family.samples
            if not s.name.endswith("_created")}


@pytest.mark.parametrize("labelnames", [(), ("stage",)])
def test_the_exposition_equals_prometheus_clients_for_the_same_observations(labelnames):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = LoopHistogram("h_seconds", "doc", labelnames, buckets=BUCKETS, registry=ours)
    reference = Histogram("h_seconds", "doc", labelnames, buckets=BUCKETS, registry=theirs)
    rng = random.Random(7)
    values = [0.0, 0.0001, 0.001, 1.0, 5.0, -1.0] + [rng.expovariate(100) for _ in range(500)]
    for i, value in enumerate(values):
        label = ("parse", "lookup")[i % 2]
        (fast.labels(label) if labelnames else fast).observe(value)
        (reference.labels(label) if labelnames else reference).observe(value)
    got, want = samples(ours, "h_seconds"), samples(theirs, "h_seconds")
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_a_label_set_of_the_wrong_length_is_refused():
    fast = LoopHistogram("h_seconds", "doc", ("stage",), buckets=BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError):
        fast.labels("parse", "extra")


def test_the_decision_stages_are_exported_with_their_names():
    metrics = Metrics()
    metrics.stage_seconds.labels("decision").observe(0.0004)
    metrics.prefix_ratio.observe(1.0)
    exported = generate_latest(metrics.registry).decode()
    assert 'kv_extproc_stage_seconds_bucket{le="0.0005",stage="decision"} 1.0' in exported
    assert 'kv_extproc_stage_seconds_bucket{le="0.00025",stage="decision"} 0.0' in exported
    assert "kv_extproc_matched_prefix_ratio_count 1.0" in exported


def test_a_second_metric_of_the_same_name_is_refused():
    registry = CollectorRegistry()
    LoopHistogram("h_seconds", "doc", buckets=BUCKETS, registry=registry)
    with pytest.raises(ValueError):
        Histogram("h_seconds", "doc", buckets=BUCKETS, registry=registry)
