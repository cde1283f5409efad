"""The routing decision: filters, the prefix lookup, scorers and a picker (scoring/).

Nothing here may lose a request: every failure on the way (tokenizer, index, time budget)
ends in a load-based pick, counted by reason.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .index import IndexUnavailable
from .indexer import Indexer, PromptTooLong
from .logs import ThrottledLog
from .metrics import Metrics
from .pods import PodPool
from .requests import RoutingRequest
from .scoring import Context, Decision, Profile
from .tokenization import PromptRenderError, TokenizerBusy, TokenizerUnavailable

log = logging.getLogger("extproc.routing")


class Router:
    def __init__(self, pool: PodPool, indexer: Indexer, profile: Profile, metrics: Metrics, *,
                 decision_timeout: float, log_prompts: bool = False):
        self.pool = pool
        self.indexer = indexer
        self.profile = profile
        self.metrics = metrics
        self.decision_timeout = decision_timeout
        self.log_prompts = log_prompts
        self._warn = ThrottledLog(log)

    async def route(self, request: RoutingRequest) -> Decision | None:
        """The pod for this request, or None when no pod is configured at all."""
        serving = self.pool.serving(request.model)
        candidates = self.profile.filter(request, serving)
        if not candidates:
            if serving:
                # Every pod of the model fails its health checks: let Envoy's own pool decide.
                self._count_fallback("no_healthy_pod", f"no healthy pod serves model {request.model!r}")
                return None
            healthy = self.pool.healthy()
            if not healthy:
                return None
            return self._fallback("unknown_model", f"no configured pod serves model {request.model!r}", healthy)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.decision_timeout):
                match = await self.indexer.get_pod_scores(request, [pod.id for pod in candidates])
        except TokenizerUnavailable as exc:
            return self._fallback("tokenizer", str(exc), candidates)
        except TokenizerBusy as exc:
            return self._fallback("tokenizer_busy", str(exc), candidates)
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
            candidates = self.profile.filter(request, self.pool.serving(request.model)) or self.pool.healthy()
            if not candidates:
                return None
        decision = self.profile.decide(Context(request, match.matched, match.total_blocks), candidates)
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
        return Decision(self.pool.least_loaded(candidates), 0.0, 0, 0, by_cache=False)

    def _count_fallback(self, reason: str, message: str) -> None:
        self.metrics.requests.labels("fallback").inc()
        self.metrics.fallbacks.labels(reason).inc()
        self._warn.warning(reason, f"routing by load: {message}")
