"""Logging set-up: text or one JSON object per line, and never prompt text unless asked.

Extra fields given with ``extra={"fields": {...}}`` become top-level keys in JSON and
``key=value`` pairs in text, so the per-decision line is machine-readable in both.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class ThrottledLog:
    """Logs a given reason at most once per interval, so an outage, a misbehaving publisher
    or a client repeating a bad request cannot flood the logs."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_reasons: int = 1024):
        self._logger = logger
        self._interval = interval
        self._max_reasons = max_reasons
        self._last: dict[str, float] = {}

    def _due(self, reason: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(reason, -self._interval) < self._interval:
            return False
        if len(self._last) >= self._max_reasons and reason not in self._last:
            self._last.clear()  # reasons are bounded by the caller; this only guards memory
        self._last[reason] = now
        return True

    def warning(self, reason: str, message: str) -> None:
        if self._due(reason):
            self._logger.warning("%s (reason=%s; repeats suppressed for %.0fs)", message, reason, self._interval)

    def exception(self, reason: str, message: str) -> None:
        """Inside an ``except`` block: the message with its traceback, at most once per interval."""
        if self._due(reason):
            self._logger.error("%s (reason=%s; repeats suppressed for %.0fs)", message, reason, self._interval,
                               exc_info=True)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def setup(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(logging.WARNING)
