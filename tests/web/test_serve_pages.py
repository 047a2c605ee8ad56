"""`linkcrm serve` and the delivery log: it says where the page is (or how to turn it on),
and the page is off until LINKCRM_UI_PASSWORD is set, without touching the other endpoints."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.service_process import cli, service_env, start_server


def test_serve_prints_the_page_address_and_serves_it(tmp_path: Path) -> None:
    env = service_env(tmp_path, LINKCRM_UI_PASSWORD="a long serve password")
    server = start_server(env)
    try:
        answer = httpx.get(f"{server.url}/ui/", timeout=10)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/login")
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        server.stop()
    log = server.log.read_text()
    assert f"delivery log page: http://127.0.0.1:{server.port}/ui/ (log in with " \
           "LINKCRM_UI_PASSWORD)" in log
    assert "a long serve password" not in log


def test_without_a_password_serve_says_how_to_turn_the_page_on(tmp_path: Path) -> None:
    server = start_server(service_env(tmp_path))
    try:
        answer = httpx.get(f"{server.url}/ui/events", timeout=10)
        assert answer.status_code == 404
        assert "set LINKCRM_UI_PASSWORD" in answer.text
    finally:
        server.stop()
    assert "delivery log page: off (set LINKCRM_UI_PASSWORD to turn it on)" in \
        server.log.read_text()


def test_a_short_password_stops_serve_with_the_fix(tmp_path: Path) -> None:
    done = cli("serve", "--port", "0", env=service_env(tmp_path, LINKCRM_UI_PASSWORD="short"))
    assert done.returncode == 2
    assert "LINKCRM_UI_PASSWORD is 5 characters long; it needs at least 12" in done.stderr
    assert "short" not in done.stderr.replace("LINKCRM_UI_PASSWORD is 5", "")
