"""The listening sockets of `linkcrm serve`, bound before anything else starts.

Binding first turns "the port is taken" into one clear error and its own exit code, before the
database is migrated or a CRM is called, instead of a server that starts, fails to listen, and
leaves `send-samples` talking to whatever else holds the port.
"""

from __future__ import annotations

import errno
import socket

from .output import fail

EXIT_CANNOT_LISTEN = 3
BACKLOG = 2048  # uvicorn's default


def address(host: str, port: int) -> str:
    """`host:port`, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` resolves to (as asyncio's `create_server` binds
    them); exit 3 with the reason and the fix when one cannot be bound."""
    where = address(host, port)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        fail(f"cannot listen on {where}: the host {host!r} does not resolve ({error.strerror}); "
             "use --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)",
             EXIT_CANNOT_LISTEN)
    bound: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    for family, kind, protocol, _, sockaddr in infos:
        if (family, sockaddr) in seen:
            continue
        seen.add((family, sockaddr))
        sock = socket.socket(family, kind, protocol)
        bound.append(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as error:
            for opened in bound:
                opened.close()
            fail(f"cannot listen on {where}: {_reason(error, host, port)}", EXIT_CANNOT_LISTEN)
    return bound


def _reason(error: OSError, host: str, port: int) -> str:
    if error.errno == errno.EADDRINUSE:
        return (f"port {port} is in use (another `linkcrm serve`?); stop the process that "
                f"holds it, or pick a free port with --port {port + 1 if port < 65535 else 8000}"
                " (and the same --url for send-samples)")
    if error.errno == errno.EACCES:
        return (f"permission denied (ports below 1024 need extra rights); use --port "
                f"{8000 if port < 1024 else port}")
    if error.errno == errno.EADDRNOTAVAIL:
        return (f"{host} is not an address of this machine; use --host 127.0.0.1 or "
                "--host 0.0.0.0")
    return error.strerror or str(error)
