"""JSON log lines and the repeat limit that keeps one call site from flooding the log."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.runtime.logs import RepeatFilter, configure_logging


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _warn(log: logging.Logger, n: int) -> None:
    for i in range(n):
        log.warning("request deadline passed; closing the connection", extra={"n": i})


def test_one_call_site_writes_at_most_burst_lines_then_one_summary(
    restore_root: None,
) -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", stream, burst=5, interval=60.0)
    log = logging.getLogger("engine.test_flood")
    _warn(log, 1000)
    lines = _lines(stream)
    assert len(lines) == 5
    assert [line["n"] for line in lines] == [0, 1, 2, 3, 4]
    handler.close()  # at shutdown, the held-back count is reported
    summary = _lines(stream)[-1]
    assert summary["message"] == "suppressed 995 similar lines"
    assert summary["suppressed"] == 995
    assert summary["level"] == "warning" and summary["logger"] == "engine.test_flood"
    assert summary["like"] == "request deadline passed; closing the connection"


def test_the_summary_comes_when_the_window_ends_and_sites_are_counted_apart() -> None:
    clock = _Clock()
    reported: list[logging.LogRecord] = []
    repeats = RepeatFilter(reported.append, burst=3, interval=10.0, clock=clock)

    def record(line: int, message: str = "same site") -> logging.LogRecord:
        return logging.LogRecord("engine.x", logging.ERROR, "x.py", line, message, None, None)

    # A varying message from one call site is still a repeat (asyncio names the socket).
    admitted = [repeats.filter(record(7, f"accept failed on fd {i}")) for i in range(50)]
    assert admitted == [True] * 3 + [False] * 47
    assert all(repeats.filter(record(8)) for _ in range(3))  # another site has its own budget
    assert reported == []
    clock.now += 10.0
    assert repeats.filter(record(9))  # any record after the window reports what it held back
    [summary] = reported
    assert summary.getMessage() == "suppressed 47 similar lines"
    assert (summary.lineno, summary.levelno) == (7, logging.ERROR)
    assert summary.__dict__["like"] == "accept failed on fd 0"
    assert repeats.filter(record(7))  # and the site has a fresh budget
    repeats.flush()
    assert len(reported) == 1  # nothing else was held back


def test_debug_records_are_not_limited() -> None:
    repeats = RepeatFilter(lambda record: None, burst=1, interval=10.0)
    record = logging.LogRecord("engine.x", logging.DEBUG, "x.py", 1, "event stored", None, None)
    assert all(repeats.filter(record) for _ in range(100))


def test_tracebacks_are_limited_too(restore_root: None) -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", stream, burst=2, interval=60.0)
    log = logging.getLogger("asyncio")
    for _ in range(500):
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            log.exception("socket.accept() out of system resource")
    handler.close()
    lines = _lines(stream)
    assert len(lines) == 3
    assert all("Too many open files" in str(line["traceback"]) for line in lines[:2])
    assert lines[2]["message"] == "suppressed 498 similar lines"
    assert "traceback" not in lines[2]


@pytest.mark.parametrize(("burst", "interval"), [(0, 1.0), (1, 0.0)])
def test_limits_must_be_positive(burst: int, interval: float) -> None:
    with pytest.raises(ValueError, match="burst must be at least 1"):
        RepeatFilter(lambda record: None, burst=burst, interval=interval)


def test_a_lone_surrogate_in_a_field_is_escaped_not_an_encoding_error(
    restore_root: None, tmp_path: Path
) -> None:
    with (tmp_path / "log").open("w", encoding="utf-8") as stream:
        handler = configure_logging("INFO", stream)
        logging.getLogger("engine.test").warning("refused", extra={"event_type": "x\ud800é"})
        handler.flush()
    text = (tmp_path / "log").read_text(encoding="utf-8")
    assert '"event_type": "x\\ud800é"' in text  # JSON's own escape: the line stays valid
    [line] = _lines(io.StringIO(text))
    assert line["event_type"] == "x\ud800é"
