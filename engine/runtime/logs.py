"""Structured logs: one JSON object per line, with the fields passed in `extra=`, rate-limited.

Callers put only identifiers and counts in `extra` (event id, event type, reason); bodies,
signatures, secrets and personal data (emails, names, IPs) are never logged. One call site
writes at most `burst` lines per `interval` seconds; the rest are counted and reported as one
"suppressed K similar lines" line, so no client (idle connections, bad requests) and no fault
(no file descriptors left) can flood the log.

    log.info("event stored", extra={"event_id": 42, "event_type": "install.tracked"})
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

# Defaults of `configure_logging`: lines per call site and window.
BURST = 20
INTERVAL_SECONDS = 30.0

SiteKey = tuple[str, int, str, int]


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...extra}`; exceptions as a `traceback` field."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in payload and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["traceback"] = self.formatException(record.exc_info)
        line = json.dumps(payload, default=str, ensure_ascii=False)
        if not line.isascii():
            # A lone surrogate (from a webhook's JSON) cannot be written as UTF-8: escape it
            # rather than lose the line to an encoding error.
            line = line.encode("utf-8", "backslashreplace").decode("utf-8")
        return line


@dataclass
class _Window:
    started: float
    sample: logging.LogRecord
    passed: int = 0
    suppressed: int = 0


class RepeatFilter(logging.Filter):
    """Lets at most `burst` records of one call site (logger, level, file, line) through per
    `interval` seconds. What it holds back is reported through `report` as one record,
    "suppressed K similar lines", once that window has ended: with the next record that passes
    through the filter (of any call site) or at `flush()`.

    Call sites, not message texts, are counted: a message that embeds a varying value (asyncio's
    "socket.accept() out of system resource" names the socket) still counts as a repeat, and
    the number of windows is bounded by the code, never by what clients send. DEBUG records
    pass unlimited: debug logging is switched on by hand, to see everything.

        handler.addFilter(RepeatFilter(handler.handle, burst=20, interval=30.0))
    """

    def __init__(
        self,
        report: Callable[[logging.LogRecord], object],
        *,
        burst: int = BURST,
        interval: float = INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if burst < 1 or not interval > 0:
            raise ValueError("burst must be at least 1 and interval greater than 0")
        self._report = report
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._windows: dict[SiteKey, _Window] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or getattr(record, "_linkcrm_summary", False):
            return True
        now = self._clock()
        key = (record.name, record.levelno, record.pathname, record.lineno)
        with self._lock:
            due = self._sweep(now) if now >= self._next_sweep else []
            window = self._windows.get(key)
            if window is None or now - window.started >= self._interval:
                if window is not None and window.suppressed:
                    due.append(_summary(window))
                window = self._windows[key] = _Window(started=now, sample=record)
            admitted = window.passed < self._burst
            if admitted:
                window.passed += 1
            else:
                window.suppressed += 1
        for summary in due:
            self._report(summary)
        return admitted

    def flush(self) -> None:
        """Report every count still held back (at shutdown), ended windows or not."""
        with self._lock:
            due = [_summary(w) for w in self._windows.values() if w.suppressed]
            self._windows.clear()
        for summary in due:
            self._report(summary)

    def _sweep(self, now: float) -> list[logging.LogRecord]:
        """Drop ended windows, returning the summaries of those that held lines back."""
        self._next_sweep = now + min(self._interval, 1.0)
        ended = [key for key, w in self._windows.items() if now - w.started >= self._interval]
        summaries = []
        for key in ended:
            window = self._windows.pop(key)
            if window.suppressed:
                summaries.append(_summary(window))
        return summaries


def _summary(window: _Window) -> logging.LogRecord:
    sample = window.sample
    record = logging.LogRecord(
        sample.name, sample.levelno, sample.pathname, sample.lineno,
        "suppressed %d similar lines", (window.suppressed,), None,
    )
    # The message template only (never its arguments), first line, as it was logged already.
    like = str(sample.msg).splitlines()[0] if str(sample.msg).strip() else ""
    record.__dict__.update({
        "suppressed": window.suppressed,
        "like": like[:160],
        "_linkcrm_summary": True,
    })
    return record


class _JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that reports held-back counts before it closes."""

    repeats: RepeatFilter | None = None

    def close(self) -> None:
        if self.repeats is not None:
            repeats, self.repeats = self.repeats, None
            repeats.flush()
        super().close()


def configure_logging(
    level: str = "INFO",
    stream: TextIO | None = None,
    *,
    burst: int = BURST,
    interval: float = INTERVAL_SECONDS,
) -> logging.Handler:
    """Send every log record (linkcrm's and uvicorn's) to `stream` as JSON lines, at most
    `burst` lines per call site every `interval` seconds. Returns the handler."""
    handler = _JsonLinesHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.repeats = RepeatFilter(handler.handle, burst=burst, interval=interval)
    handler.addFilter(handler.repeats)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # The HTTP client logs every CRM request's URL, and search and query URLs hold identity
    # values (emails): personal data. Its warnings still show; its request lines never do.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
