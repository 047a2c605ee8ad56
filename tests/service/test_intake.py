"""read_body: a body already there is taken without a deadline; one still arriving is read under
it, in chunks, capped, and a client that goes away is a ClientDisconnect on either path."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from starlette.requests import ClientDisconnect
from starlette.types import Message

from engine.service.intake import Rejected, read_body

Receive = Callable[[], Awaitable[Message]]


def ready(*messages: Message) -> Receive:
    """A receive whose messages are all there: it never suspends."""
    queue = list(messages)

    async def receive() -> Message:
        return queue.pop(0)

    return receive


def arriving(*messages: Message | float) -> Receive:
    """A receive that waits (a float: that many seconds) before each message that follows."""
    queue = list(messages)

    async def receive() -> Message:
        while isinstance(queue[0], float):
            await asyncio.sleep(queue.pop(0))  # type: ignore[arg-type]
        item = queue.pop(0)
        assert not isinstance(item, float)
        return item

    return receive


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


DISCONNECT: Message = {"type": "http.disconnect"}


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[bytes]], bytes]:
    """Run on both loops: `serve` runs uvloop, tests and other tools asyncio."""
    def runner(awaitable: Awaitable[bytes]) -> bytes:
        async def main() -> bytes:
            return await awaitable
        if request.param == "uvloop":
            return uvloop.run(main())
        return asyncio.run(main())
    return runner


def test_a_body_that_is_there_starts_no_deadline(
    run: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common case costs no timer; the timer costs as much as parsing the body."""
    def no_timer(delay: float | None) -> asyncio.Timeout:
        raise AssertionError("a deadline was started for a body that was there")

    monkeypatch.setattr(asyncio, "timeout", no_timer)
    assert run(read_body(ready(body(b"{}")), 100, 5.0)) == b"{}"


def test_a_body_arriving_in_chunks_is_joined(run: Callable[..., bytes]) -> None:
    receive = arriving(0.01, body(b"ab", more=True), 0.01, body(b"cd", more=True), body(b"e"))
    assert run(read_body(receive, 100, 5.0)) == b"abcde"


def test_a_first_chunk_that_is_there_then_more_later(run: Callable[..., bytes]) -> None:
    receive = arriving(body(b"ab", more=True), 0.01, body(b"cd"))
    assert run(read_body(receive, 100, 5.0)) == b"abcd"


@pytest.mark.parametrize("first_there", [True, False])
def test_a_body_that_stops_arriving_is_a_408_at_the_deadline(
    run: Callable[..., bytes], first_there: bool
) -> None:
    messages: list[Message | float] = [body(b"ab", more=True), 60.0, body(b"cd")]
    if not first_there:
        messages.insert(0, 0.01)
    with pytest.raises(Rejected) as refused:
        run(asyncio.wait_for(read_body(arriving(*messages), 100, 0.2), 5))
    assert (refused.value.status, refused.value.reason) == (408, "timeout")
    assert "within 0.2 seconds" in refused.value.message


@pytest.mark.parametrize(
    "make",
    [lambda: ready(DISCONNECT), lambda: arriving(0.01, DISCONNECT),
     lambda: arriving(body(b"a", more=True), 0.01, DISCONNECT)],
    ids=["there", "later", "after-a-chunk"],
)
def test_a_client_that_goes_away_is_a_client_disconnect(
    run: Callable[..., bytes], make: Callable[[], Receive]
) -> None:
    with pytest.raises(ClientDisconnect):
        run(read_body(make(), 100, 5.0))


@pytest.mark.parametrize(
    "make",
    [lambda: ready(body(b"x" * 101)),
     lambda: arriving(body(b"x" * 60, more=True), 0.01, body(b"x" * 60))],
    ids=["whole", "chunked"],
)
def test_a_body_over_the_cap_is_a_413(
    run: Callable[..., bytes], make: Callable[[], Receive]
) -> None:
    with pytest.raises(Rejected) as refused:
        run(read_body(make(), 100, 5.0))
    assert refused.value.status == 413
