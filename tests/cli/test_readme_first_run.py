"""The README's first command as a new user runs it: typed into an interactive bash on a
terminal, left to show the contact and the deal, then stopped with Ctrl-C, after which
nothing of it may still run or hold the port."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import sys
import time
from pathlib import Path

import httpx

from tests.support.service_process import ROOT, free_port

INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "


def first_command() -> str:
    """The first command line of the README's first code block (the install part removed:
    the test runs in the venv that is already installed)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    command = next(line for line in block.group(1).splitlines()
                   if line.strip() and not line.startswith("#"))
    assert command.startswith(INSTALL), command
    return command.removeprefix(INSTALL)


class Terminal:
    """An interactive bash on a pseudo-terminal, as a person would have it."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: bash with the terminal as its controlling tty
            os.chdir(cwd)
            os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], env)
        self.output = ""

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def read_until(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; the terminal "
                                     f"shows:\n{self.output}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    self.output += os.read(self.fd, 65536).decode(errors="replace")
                except OSError:  # the shell is gone
                    break
        return self.output

    def close(self) -> None:
        try:
            self.type("kill $(jobs -p) 2>/dev/null; exit\n")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                time.sleep(0.1)
        except OSError:
            pass
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (OSError, ChildProcessError):
            pass
        os.close(self.fd)


def contacts_page(address: str, password: str) -> str:
    """The contacts page, logged in with the password the command printed."""
    with httpx.Client(base_url=address.removesuffix("/ui/"), timeout=10) as client:
        form = client.get("/ui/login").text
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', form)
        assert token is not None, form
        answer = client.post("/ui/login", data={"csrf": token.group(1), "password": password,
                                                "next": "/ui/contacts"})
        assert answer.status_code == 303, answer.text
        return client.get("/ui/contacts").text


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_ctrl_c_stops_the_first_command_and_frees_the_port(tmp_path: Path) -> None:
    port = free_port()
    command = first_command()
    assert command.count("linkcrm serve") == 1 and command.count("linkcrm send-samples") == 1
    assert command.count("127.0.0.1:8000") == 1  # the delivery log's address it prints
    command = command.replace("linkcrm serve", f"linkcrm serve --port {port}").replace(
        "linkcrm send-samples", f"linkcrm send-samples --url http://127.0.0.1:{port}").replace(
        "127.0.0.1:8000", f"127.0.0.1:{port}")
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "TERM": "xterm", "PS1": "$ ", "LINKCRM_RULES": str(ROOT / "rules")}
    terminal = Terminal(tmp_path, env)
    try:
        terminal.read_until(r"\$ $", timeout=10)
        terminal.type(command + "\n")
        terminal.read_until(r"deal 1 .*key: referral-ref_sample_sam", timeout=90)
        shown = terminal.read_until(r"delivery log: (\S+) password: (\S+)\r?\n", timeout=30)
        printed = re.findall(r"delivery log: (\S+) password: (\S+)\r?\n", shown)[-1]
        assert printed[0] == f"http://127.0.0.1:{port}/ui/", shown
        assert "ref_sample_sam" in contacts_page(printed[0], printed[1])
        assert not port_is_free(port)  # serving
        time.sleep(2)  # the echo has printed; let the subshell exit, so Ctrl-C finds only serve
        terminal.type("\x03")  # Ctrl-C
        time.sleep(1)  # typed after the interrupt is handled (Ctrl-C flushes pending input)
        terminal.type("echo stopped-$?-$((1+1))\n")
        terminal.read_until(r"stopped-\d+-2", timeout=30)
        assert "stopped-0-2" in terminal.output, terminal.output  # a clean stop, no "Aborted!"
        assert port_is_free(port), terminal.output
        terminal.type("jobs; echo listed-$((1+1))\n")
        shown = terminal.read_until("listed-2", timeout=10)
        assert "Running" not in shown.rsplit("stopped-0-2", 1)[-1], shown
    finally:
        terminal.close()
    assert (tmp_path / "linkcrm.db").exists()
