"""A `linkcrm ... --watch` process in a test: its output read line by line as it comes."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support.paths import REPO


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child, before Python starts: SIGINT back to its default. A shell ignores it in
    the jobs it starts with `&` when not interactive, and Python then never turns it into
    KeyboardInterrupt: a suite started that way would wait for a watch Ctrl-C cannot stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Watched:
    """A `linkcrm ... --watch` process whose output lines are read as they come."""

    def __init__(self, *args: str, cwd: Path = REPO) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *args], cwd=cwd, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ),
            preexec_fn=_ctrl_c_as_in_a_terminal)
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, predicate: str, seconds: float = 60) -> list[str]:
        """Lines up to and including the first that starts with `predicate`."""
        seen: list[str] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            if line.startswith(predicate):
                return seen
        raise AssertionError(f"no line starting {predicate!r} in {seen}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=30)
        self.reader.join(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code
