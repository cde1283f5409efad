"""Logs: one JSON object per line when asked, decision fields included, prompts never by default."""

import json
import logging

from extproc import scoring
from extproc.config import ScoringConfig
from extproc.config import PodConfig
from extproc.index.memory import MemoryIndex
from extproc.indexer import Indexer
from extproc.logs import JsonFormatter, TextFormatter
from extproc.metrics import Metrics
from extproc.pods import PodPool
from extproc.requests import RoutingRequest
from extproc.routing import Router
from extproc.tokenization import TokenizerManager


def record(message: str, **fields) -> logging.LogRecord:
    rec = logging.LogRecord("extproc.routing", logging.DEBUG, __file__, 1, message, None, None)
    rec.fields = fields
    return rec


def test_json_lines_carry_the_fields():
    line = JsonFormatter().format(record("routed", pod="pod-a", score=75.0))
    entry = json.loads(line)
    assert entry["message"] == "routed" and entry["pod"] == "pod-a" and entry["score"] == 75.0
    assert entry["level"] == "debug" and entry["logger"] == "extproc.routing" and entry["time"].endswith("Z")


def test_text_lines_carry_the_fields_as_pairs():
    assert TextFormatter().format(record("routed", pod="pod-a")).endswith("routed pod=pod-a")


async def _decide(tokenizer_dir, caplog, *, log_prompts: bool) -> list[dict]:
    tokenizers = TokenizerManager({"m": tokenizer_dir})
    router = Router(PodPool([PodConfig(id="pod-a", address="10.0.0.1:8000")]),
                    Indexer(tokenizers, MemoryIndex(), block_size=16, max_blocks=8, scheme="chained"),
                    scoring.build(ScoringConfig()), Metrics(), decision_timeout=10, log_prompts=log_prompts)
    try:
        with caplog.at_level(logging.DEBUG, logger="extproc.routing"):
            await router.route(RoutingRequest(model="m", kind="completion", prompt="TOP SECRET PROMPT " * 10))
    finally:
        tokenizers.close()
    return [r.fields for r in caplog.records if r.getMessage() == "routed"]


async def test_one_debug_line_per_decision_without_the_prompt(tokenizer_dir, caplog):
    [fields] = await _decide(tokenizer_dir, caplog, log_prompts=False)
    assert {"model", "pod", "score", "matched_blocks", "total_blocks", "tokenize_ms", "lookup_ms", "decision_ms"} <= set(fields)
    assert "TOP SECRET" not in json.dumps(fields) and "TOP SECRET" not in caplog.text


async def test_prompts_are_logged_only_when_enabled(tokenizer_dir, caplog):
    [fields] = await _decide(tokenizer_dir, caplog, log_prompts=True)
    assert "TOP SECRET" in fields["prompt"]
