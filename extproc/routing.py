"""The routing decision: filters, the prefix lookup, scorers and a picker (scoring/).

Nothing here may lose a request: every failure on the way (tokenizer, index, time budget)
ends in a load-based pick, counted by reason. Only when no pod may take the request is it
answered at once (NoRoute): 404 for a model no pod serves (the client's mistake), 503 when
the model's pods exist but none is ready or in the proxy's subset hint.
"""

from __future__ import annotations

import json
import logging
import time

from .eager import within
from .index import IndexUnavailable
from .indexer import Indexer, PromptTooLong
from .logs import ThrottledLog
from .metrics import Metrics
from .pods import PodPool
from .remotetok import RemoteTokenizerUnavailable
from .requests import RoutingRequest
from .scoring import Context, Decision, Profile
from .scoring.filters import SubsetHint
from .tokenization import PromptRenderError, TokenizerBusy, TokenizerUnavailable

log = logging.getLogger("extproc.routing")


class NoRoute(Exception):
    """No pod may take this request: the client gets ``status`` with an OpenAI-style JSON error."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> bytes:
        kind = "invalid_request_error" if self.status < 500 else "service_unavailable_error"
        param = "model" if self.code == "model_not_found" else None
        return json.dumps({"error": {"message": self.message, "type": kind, "param": param, "code": self.code}}).encode()


class Router:
    def __init__(self, pool: PodPool, indexer: Indexer, profile: Profile, metrics: Metrics, *,
                 decision_timeout: float, log_prompts: bool = False, clock=time.monotonic):
        self.pool = pool
        self.indexer = indexer
        self.profile = profile
        self.metrics = metrics
        self.decision_timeout = decision_timeout
        self.log_prompts = log_prompts
        self.clock = clock
        """Stamps decisions; the pods' open requests must be stamped on the same clock."""
        self._warn = ThrottledLog(log)
        self._subset = SubsetHint()

    def candidates(self, request: RoutingRequest) -> list:
        """Pods that may take the request; NoRoute when none may."""
        serving = self.pool.serving(request.model)
        if not serving:
            if request.model in self.pool.models:
                raise NoRoute(503, "no_ready_pod", f"no ready pod serves model {request.model!r} right now")
            raise NoRoute(404, "model_not_found", f"The model {request.model!r} does not exist or no pod serves it")
        candidates = self._subset.filter(request, self.profile.filter(request, serving))
        if not candidates:
            if request.subset is not None:
                raise NoRoute(503, "no_eligible_endpoint",
                              f"none of the {len(request.subset)} endpoint(s) in the proxy's subset hint is a ready pod "
                              f"of model {request.model!r}")
            raise NoRoute(503, "no_ready_pod", f"no ready pod serves model {request.model!r} right now")
        return candidates

    async def route(self, request: RoutingRequest) -> Decision | None:
        """The pod (and alternates) for this request; None when nothing is configured at all (no
        pods, no models: Envoy's default route decides); NoRoute when no pod may take it."""
        if not len(self.pool) and not self.pool.models:
            return None
        candidates = self.candidates(request)
        started = time.perf_counter()
        try:
            # A decision that waits on nothing (a repeat, a new turn after a cached prefix) pays
            # for no timer; one that waits (a tokenizer thread, the index) has what is left of
            # decisionTimeout.
            match = await within(self.indexer.get_pod_scores(request, [pod.id for pod in candidates]),
                                 self.decision_timeout, started=started)
        except TokenizerUnavailable as exc:
            return self._fallback("tokenizer", str(exc), candidates)
        except TokenizerBusy as exc:
            return self._fallback("tokenizer_busy", str(exc), candidates)
        except RemoteTokenizerUnavailable as exc:
            return self._fallback("remote_tokenizer", str(exc), candidates)
        except PromptTooLong as exc:
            return self._fallback("prompt_too_long", str(exc), candidates)
        except PromptRenderError as exc:
            # The client's messages, tools or template options do not render: the engine
            # will judge (and most likely refuse) the request; it is not a bug of ours.
            return self._fallback("template", str(exc), candidates)
        except IndexUnavailable as exc:
            self.metrics.index_errors.inc()
            return self._fallback("index", str(exc), candidates)
        except TimeoutError:
            return self._fallback("timeout", f"no decision within {self.decision_timeout * 1000:.0f} ms", candidates)
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not cost the client its request
            self._warn.exception("error_traceback", "routing failed")  # at most once per interval
            return self._fallback("error", f"{type(exc).__name__}: {exc}", candidates)
        if any(self.pool.get(pod.id) is not pod for pod in candidates):
            # The pod list was reloaded while we waited on the tokenizer or the index: decide
            # among the pods configured now, so a removed pod gets no traffic from this moment.
            candidates = self.candidates(request)
        if match.degraded:
            self.metrics.index_errors.inc()
            self._warn.warning("index_partial", "index unavailable: routing by the block owners this replica knows")
        context = Context(request, match.matched, match.total_blocks, self.indexer.block_size, match.prompt_tokens,
                          match.weighted, self.clock())
        decision = self.profile.decide(context, candidates)
        self.indexer.routed(request.model, match.keys, decision.pod.id, decision.matched_blocks)
        elapsed = time.perf_counter() - started
        for stage, seconds in match.timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.stage_seconds.labels("decision").observe(elapsed)
        if match.total_blocks:
            self.metrics.prefix_ratio.observe(decision.matched_blocks / match.total_blocks)
        self.metrics.requests.labels("cache" if decision.by_cache else "load").inc()
        if match.cache != "off":
            self.metrics.cache_lookups.labels(match.cache).inc()
        if log.isEnabledFor(logging.DEBUG):
            fields = {
                "model": request.model,
                "pod": decision.pod.id,
                "score": round(decision.score, 1),
                "matched_blocks": decision.matched_blocks,
                "total_blocks": decision.total_blocks,
                "by_cache": decision.by_cache,
                **{f"{scorer}_raw": values for scorer, values in decision.raw.items()},
                "prefix_cache": match.cache,
                **{f"{stage}_ms": round(seconds * 1000, 3) for stage, seconds in match.timings.items()},
                "decision_ms": round(elapsed * 1000, 3),
            }
            if self.log_prompts:
                fields["prompt"] = request.prompt if request.kind == "completion" else request.messages
            log.debug("routed", extra={"fields": fields})
        return decision

    def _fallback(self, reason: str, message: str, candidates: list) -> Decision:
        self._count_fallback(reason, message)
        pod = self.pool.least_loaded(candidates)
        alternates = sorted((p for p in candidates if p is not pod), key=lambda p: p.in_flight)
        return Decision(pod, 0.0, 0, 0, by_cache=False, alternates=tuple(alternates))

    def _count_fallback(self, reason: str, message: str) -> None:
        self.metrics.requests.labels("fallback").inc()
        self.metrics.fallbacks.labels(reason).inc()
        self._warn.warning(reason, f"routing by load: {message}")
