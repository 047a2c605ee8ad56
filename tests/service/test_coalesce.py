"""CoalescingTransport: writes of one event-loop step leave in one send; close sends first."""

from __future__ import annotations

import asyncio

from engine.service.coalesce import CoalescingTransport


class _Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_head_and_body_written_in_one_step_leave_in_one_send() -> None:
    async def run() -> list[bytes]:
        inner = _Recording()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert inner.sent == []  # nothing before the step ends
        await asyncio.sleep(0)
        transport.write(b"next")
        await asyncio.sleep(0)
        return inner.sent

    assert asyncio.run(run()) == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"next"]


def test_close_sends_what_was_collected_then_closes_and_later_writes_go_nowhere() -> None:
    async def run() -> _Recording:
        inner = _Recording()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        transport.close()
        assert transport.is_closing()
        transport.write(b"too late")
        await asyncio.sleep(0)  # the flush scheduled by the late write finds the transport closed
        return inner

    inner = asyncio.run(run())
    assert inner.sent == [b"HTTP/1.1 400 Bad Request\r\n\r\n"]
    assert inner.closed


def test_everything_else_is_passed_on() -> None:
    async def run() -> None:
        inner = _Recording()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        transport.pause_reading()
        assert inner.paused
        transport.resume_reading()
        assert not inner.paused
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
        transport.write(b"12345")
        assert transport.get_write_buffer_size() == 5
        assert not transport.can_write_eof()

    asyncio.run(run())
