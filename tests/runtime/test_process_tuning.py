"""The service processes tune the interpreter before they start: the switch interval (the SQLite
writer gets the GIL back promptly) and the cycle collector (start-up objects frozen, rare walks).
Both `linkcrm serve` and `linkcrm worker` do it, before their event loop starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.runtime.collector import THRESHOLDS
from engine.runtime.gil import SWITCH_INTERVAL_SECONDS
from engine.runtime.settings import Settings


def test_the_tuning_sets_the_switch_interval_freezes_and_raises_the_thresholds() -> None:
    script = (
        "import gc, sys\n"
        "from engine.runtime.collector import collect_cycles_seldom\n"
        "from engine.runtime.gil import share_the_gil_promptly\n"
        "before = gc.get_freeze_count()\n"
        "share_the_gil_promptly(); collect_cycles_seldom()\n"
        "print(json.dumps([sys.getswitchinterval(), gc.get_threshold(), before,\n"
        "                  gc.get_freeze_count()]))\n")
    done = subprocess.run([sys.executable, "-c", "import json\n" + script],
                          capture_output=True, text=True, check=True, timeout=60)
    interval, thresholds, before, after = json.loads(done.stdout)
    assert interval == pytest.approx(SWITCH_INTERVAL_SECONDS)
    assert tuple(thresholds) == THRESHOLDS
    assert before == 0 and after > 1000  # every object of the modules imported so far


class _Started(Exception):
    """Raised where the event loop would start."""


def _tuning_spies(monkeypatch: pytest.MonkeyPatch, module: str) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(f"{module}.share_the_gil_promptly", lambda: calls.append("gil"))
    monkeypatch.setattr(f"{module}.collect_cycles_seldom", lambda: calls.append("collector"))
    return calls


def test_serve_tunes_the_interpreter_before_its_loop_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.service import server

    calls = _tuning_spies(monkeypatch, "engine.service.server")

    def runner(**_: object) -> None:
        calls.append("loop")
        raise _Started

    monkeypatch.setattr(server.asyncio, "Runner", runner)
    with pytest.raises(_Started):
        server.run(Settings(webhook_secrets=("whsec_test",)))
    assert calls == ["gil", "collector", "loop"]


def test_worker_tunes_the_interpreter_before_its_loop_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from engine.cli import service

    calls = _tuning_spies(monkeypatch, "engine.cli.service")

    def run(coroutine: object) -> None:
        coroutine.close()  # type: ignore[attr-defined]
        calls.append("loop")
        raise _Started

    monkeypatch.setattr(service.asyncio, "run", run)
    monkeypatch.setenv("LINKCRM_TARGETS", "local")
    result = CliRunner().invoke(service.worker, [])
    assert isinstance(result.exception, _Started), result.output
    assert calls == ["gil", "collector", "loop"]
