"""Filters: candidates that must not be chosen for this request, whatever they score."""

from __future__ import annotations

from ..pods import Pod
from ..requests import RoutingRequest


class SubsetHint:
    """The proxy's subset hint (GAIE proposal 004): only the endpoints it lists may be chosen."""

    name = "subset_hint"

    def filter(self, request: RoutingRequest, pods: list[Pod]) -> list[Pod]:
        if request.subset is None:
            return pods
        return [pod for pod in pods if pod.address in request.subset]


class Healthy:
    """Pods failing their health checks (podhealth.py) are no candidates until they answer."""

    name = "healthy"

    def filter(self, request: RoutingRequest, pods: list[Pod]) -> list[Pod]:
        return [pod for pod in pods if pod.healthy]
