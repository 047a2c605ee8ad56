"""PostgreSQL URL options: linkcrm's pool settings split off before the URL reaches libpq."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from engine.errors import StorageError

T = TypeVar("T")

# URL query parameter -> environment variable; the URL wins when both are set.
POOL_OPTIONS = {
    "pool_size": "LINKCRM_DB_POOL_SIZE",
    "pool_min_size": "LINKCRM_DB_POOL_MIN_SIZE",
    "pool_timeout": "LINKCRM_DB_POOL_TIMEOUT",
}


@dataclass(frozen=True)
class PoolSettings:
    """Connections each process keeps to PostgreSQL.

    `size` is the most connections the pool opens (a receiver needs about one per concurrent
    request being stored, a worker about two per unit of concurrency); `min_size` are kept open
    while idle; `timeout` is how long a caller waits for a free connection before the call fails
    with StorageError (the receiver then answers 503 and Tolinku retries). The LISTEN
    connection a worker uses to wake up is one more, outside the pool.
    """

    size: int = 10
    min_size: int = 1
    timeout: float = 5.0


def split_url(url: str, environ: Mapping[str, str]) -> tuple[str, PoolSettings]:
    """The libpq connection URL (linkcrm's own query parameters removed) and the pool settings.

        >>> split_url("postgresql://db/linkcrm?pool_size=20&sslmode=require", {})[1].size
        20
    """
    parts = urlsplit(url)
    kept: list[tuple[str, str]] = []
    given: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in POOL_OPTIONS:
            given[name] = value
        else:
            kept.append((name, value))
    # Untouched unless it held pool options: libpq reads the rest of the URL as it was written.
    conninfo = url
    if given:
        # %20, not "+", for spaces: libpq decodes percent escapes only.
        conninfo = urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote)))
    for name, variable in POOL_OPTIONS.items():
        if name not in given and environ.get(variable, "").strip():
            given[name] = environ[variable].strip()
    size = _count(given, "pool_size", PoolSettings.size)
    min_size = _count(given, "pool_min_size", min(PoolSettings.min_size, size), minimum=0)
    if min_size > size:
        raise StorageError(
            f"pool_min_size ({min_size}) is larger than pool_size ({size}); "
            "lower pool_min_size or raise pool_size"
        )
    timeout = _seconds(given, "pool_timeout", PoolSettings.timeout)
    return conninfo, PoolSettings(size=size, min_size=min_size, timeout=timeout)


def _where(name: str) -> str:
    return f"{name} (in LINKCRM_DATABASE_URL) or {POOL_OPTIONS[name]}"


def _count(given: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    value = _option(given, name, int, lambda n: n >= minimum,
                    f"a whole number of at least {minimum}", str(max(minimum, default)))
    return default if value is None else value


def _seconds(given: Mapping[str, str], name: str, default: float) -> float:
    value = _option(given, name, float, lambda s: s > 0 and not math.isinf(s),
                    "a number of seconds greater than 0", f"{default:g}")
    return default if value is None else value


def _option(given: Mapping[str, str], name: str, parse: Callable[[str], T],
            valid: Callable[[T], bool], expected: str, example: str) -> T | None:
    """The option's value, None when it is not given; StorageError naming where it was set,
    what it must be and an example when it is not a valid value."""
    raw = given.get(name)
    if raw is None:
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise StorageError(
            f"{_where(name)} must be {expected}, got {raw!r}; e.g. ?{name}={example}")
    return value
