"""Prometheus metrics in the text exposition format, kept in memory without a client library.

The receiver counts what it accepts and rejects; the worker counts what it processes through the
same `Metrics` object (`metrics.processed`, `metrics.actions`); gauges such as the inbox depth
are read from storage when `/metrics` is scraped.

    metrics = Metrics()
    metrics.actions.inc(target="hubspot", outcome="ok")
    text = await metrics.render()
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

LabelSet = tuple[tuple[str, str], ...]

REJECT_REASONS = (
    "bad_signature",
    "too_large",
    "bad_json",
    "bad_envelope",
    "timeout",
    "storage_unavailable",
    "unauthorized",
)
# Outcomes the worker reports per action attempt and target.
ACTION_OUTCOMES = ("ok", "retried", "dead")


@dataclass(frozen=True)
class Sample:
    """One gauge value with its labels, as a collector returns it."""

    labels: Mapping[str, str]
    value: float


Collector = Callable[[], Awaitable[Iterable[Sample]]]


class Counter:
    """A monotonically increasing count per label set; safe to use from several threads."""

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = labelnames
        self._values: dict[LabelSet, float] = {}
        # The checked label set for each keyword order seen: `inc` runs on every request, and
        # checking the names again each time cost more than the increment. As many entries as
        # label sets in `_values` (times keyword orders).
        self._keys: dict[tuple[tuple[str, str], ...], LabelSet] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        given = tuple(labels.items())
        key = self._keys.get(given)
        if key is None:
            key = self._keys[given] = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[tuple[LabelSet, float]]:
        with self._lock:
            return sorted(self._values.items())

    def _key(self, labels: Mapping[str, str]) -> LabelSet:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple((name, str(labels[name])) for name in self.labelnames)


@dataclass(frozen=True)
class _Gauge:
    name: str
    help: str
    collect: Collector


class Metrics:
    """The registry behind `GET /metrics`: counters plus gauges collected at scrape time."""

    def __init__(self) -> None:
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, _Gauge] = {}
        self.received = self.counter(
            "linkcrm_events_received_total",
            "Events stored in the inbox (duplicates not included), by event type and source.",
            ("event", "source"),
        )
        self.rejected = self.counter(
            "linkcrm_requests_rejected_total",
            "Requests answered with an error instead of being stored, by reason.",
            ("reason",),
        )
        for reason in REJECT_REASONS:
            self.rejected.inc(0, reason=reason)  # every reason shows up, at 0, from the start
        self.duplicates = self.counter(
            "linkcrm_events_duplicate_total",
            "Deliveries answered 200 without storing anything new (same bytes seen before).",
            ("source",),
        )
        self.processed = self.counter(
            "linkcrm_events_processed_total",
            "Events the worker finished, by final status (processed, ignored, dead).",
            ("status",),
        )
        self.actions = self.counter(
            "linkcrm_actions_total",
            "Action attempts per target, by outcome (ok, retried, dead).",
            ("target", "outcome"),
        )

    def counter(self, name: str, help_text: str, labelnames: tuple[str, ...]) -> Counter:
        """Get or create a counter; asking twice with other labels is a programming error."""
        existing = self._counters.get(name)
        if existing is not None:
            if existing.labelnames != labelnames:
                raise ValueError(f"{name} already exists with labels {existing.labelnames}")
            return existing
        created = Counter(name, help_text, labelnames)
        self._counters[name] = created
        return created

    def gauge(self, name: str, help_text: str, collect: Collector) -> None:
        """Register a gauge whose samples `collect()` reads at every scrape."""
        self._gauges[name] = _Gauge(name, help_text, collect)

    async def render(self) -> str:
        """The text exposition (version 0.0.4). A gauge whose collector fails is left out
        (and logged) so one broken source does not hide every other metric."""
        lines: list[str] = []
        for counter in self._counters.values():
            lines.append(f"# HELP {counter.name} {_escape_help(counter.help)}")
            lines.append(f"# TYPE {counter.name} counter")
            for labels, value in counter.samples():
                lines.append(f"{counter.name}{_labels(labels)} {_number(value)}")
        for gauge in self._gauges.values():
            try:
                samples = list(await gauge.collect())
            except Exception as error:
                log.warning("metric collection failed", extra={"metric": gauge.name,
                                                               "error": str(error)})
                continue
            lines.append(f"# HELP {gauge.name} {_escape_help(gauge.help)}")
            lines.append(f"# TYPE {gauge.name} gauge")
            for sample in samples:
                labels = tuple(sorted(sample.labels.items()))
                lines.append(f"{gauge.name}{_labels(labels)} {_number(sample.value)}")
        return "\n".join(lines) + "\n"


def _labels(labels: LabelSet) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{_escape_value(value)}"' for name, value in labels)
    return "{" + inner + "}"


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value == int(value) else repr(value)
