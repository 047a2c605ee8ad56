"""Service settings read once from the environment, with errors that say how to fix them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

from engine.errors import ConfigError, Location, Problem
from engine.runtime.redact import redact_url
from engine.signing import parse_secrets

T = TypeVar("T")

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything `linkcrm serve` and `linkcrm worker` read from the environment.

    Secrets (`webhook_secrets`, `api_keys`, `metrics_keys`, `ui_password`) are kept out of
    `repr`, and the database URL shows no password, so a logged or printed Settings never
    leaks them.

        >>> Settings.from_env({"WEBHOOK_SECRET": "whsec_a"}).max_body_bytes
        1048576
    """

    database_url: str = "sqlite:///linkcrm.db"
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_keys: tuple[str, ...] = field(default=(), repr=False)
    # The delivery log page's password (LINKCRM_UI_PASSWORD); the page is off without one.
    ui_password: str | None = field(default=None, repr=False)
    rules_dir: Path = Path("rules")
    max_body_bytes: int = MIB
    request_timeout: float = 10.0
    lease_seconds: float = 60.0
    worker_concurrency: int | None = None  # None: each target's own (targets.base)
    max_attempts: int = 8
    log_level: str = "INFO"
    touch_retention_days: int = 90

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        shown["database_url"] = redact_url(self.database_url)
        return "Settings(" + ", ".join(f"{name}={value!r}" for name, value in shown.items()) + ")"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read the settings; every bad value is reported at once in one ConfigError."""
        reader = _Reader(environ)
        settings = cls(
            database_url=reader.get("LINKCRM_DATABASE_URL", cls.database_url, _url),
            webhook_secrets=reader.get("WEBHOOK_SECRET", (), _secrets),
            api_keys=reader.get("LINKCRM_API_KEYS", (), _secrets),
            metrics_keys=reader.get("LINKCRM_METRICS_KEY", (), _secrets),
            ui_password=reader.get("LINKCRM_UI_PASSWORD", None, _password),
            rules_dir=reader.get("LINKCRM_RULES", cls.rules_dir, Path),
            max_body_bytes=reader.get("LINKCRM_MAX_BODY_BYTES", cls.max_body_bytes, _positive_int),
            request_timeout=reader.get(
                "LINKCRM_REQUEST_TIMEOUT", cls.request_timeout, _positive_float
            ),
            lease_seconds=reader.get("LINKCRM_LEASE_SECONDS", cls.lease_seconds, _positive_float),
            worker_concurrency=reader.get(
                "LINKCRM_WORKER_CONCURRENCY", cls.worker_concurrency, _positive_int
            ),
            max_attempts=reader.get("LINKCRM_MAX_ATTEMPTS", cls.max_attempts, _positive_int),
            log_level=reader.get("LINKCRM_LOG_LEVEL", cls.log_level, _log_level),
            touch_retention_days=reader.get(
                "LINKCRM_TOUCH_RETENTION_DAYS", cls.touch_retention_days, _retention_days
            ),
        )
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings

    def require_webhook_secret(self) -> None:
        """Raise ConfigError unless at least one webhook secret is set (`serve` needs one)."""
        if not self.webhook_secrets:
            raise ConfigError([_problem(
                "WEBHOOK_SECRET",
                "missing-secret",
                "WEBHOOK_SECRET is not set, so no webhook could be verified",
                "copy the signing secret from Tolinku's webhook settings and run "
                "`export WEBHOOK_SECRET=whsec_...` (comma-separate several during a rotation)",
            )])


class _Reader:
    """Parses variables one by one, collecting problems instead of stopping at the first."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[Problem] = []

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self.environ.get(name)
        # An empty variable means "not set", as in most tools (`FOO= linkcrm serve`).
        if raw is None or not raw.strip():
            return default
        try:
            return parse(raw.strip())
        except ValueError as error:
            self.problems.append(_problem(name, "bad-setting", f"{name} {error}", _HINTS[name]))
            return default


def _problem(name: str, code: str, message: str, hint: str) -> Problem:
    return Problem(location=Location("environment"), code=code, message=message, hint=hint)


def _url(raw: str) -> str:
    if "://" not in raw:
        raise ValueError("is not a URL (it has no scheme://)")
    return raw


def _secrets(raw: str) -> tuple[str, ...]:
    try:
        return parse_secrets(raw)
    except ValueError as error:
        raise ValueError(f"has an empty entry: {error}") from None


UI_PASSWORD_MIN = 12


def _password(raw: str) -> str | None:
    if len(raw) < UI_PASSWORD_MIN:
        raise ValueError(f"is {len(raw)} characters long; it needs at least {UI_PASSWORD_MIN}")
    return raw


def _positive_int(raw: str) -> int:
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ValueError(f"must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a finite number greater than 0, got {raw!r}")
    return value


MAX_TOUCH_RETENTION_DAYS = 3650


def _retention_days(raw: str) -> int:
    value = _positive_int(raw)
    if value > MAX_TOUCH_RETENTION_DAYS:
        raise ValueError(f"must be at most {MAX_TOUCH_RETENTION_DAYS} days, got {value}")
    return value


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in _LEVELS:
        raise ValueError(f"must be one of {', '.join(_LEVELS)}, got {raw!r}")
    return level


_HINTS = {
    "LINKCRM_DATABASE_URL": "use sqlite:///linkcrm.db (a file) or postgresql://user@host/dbname",
    "WEBHOOK_SECRET": "set it to Tolinku's signing secret, e.g. WEBHOOK_SECRET=whsec_new,whsec_old",
    "LINKCRM_API_KEYS": "set comma-separated bearer keys, e.g. LINKCRM_API_KEYS=key1,key2",
    "LINKCRM_METRICS_KEY": "set the bearer key scrapers send (comma-separate two during a "
                           "rotation), e.g. LINKCRM_METRICS_KEY=scrape-key",
    "LINKCRM_UI_PASSWORD": "set a long random password for the delivery log page, e.g. "
                           "export LINKCRM_UI_PASSWORD=$(python3 -c 'import secrets; "
                           "print(secrets.token_urlsafe(16))')",
    "LINKCRM_RULES": "set it to the directory that holds your rule files, e.g. LINKCRM_RULES=rules",
    "LINKCRM_MAX_BODY_BYTES": "set a size in bytes, e.g. LINKCRM_MAX_BODY_BYTES=1048576 (1 MiB)",
    "LINKCRM_REQUEST_TIMEOUT": "set seconds, e.g. LINKCRM_REQUEST_TIMEOUT=10",
    "LINKCRM_LEASE_SECONDS": "set seconds, e.g. LINKCRM_LEASE_SECONDS=60",
    "LINKCRM_WORKER_CONCURRENCY": "set a count, e.g. LINKCRM_WORKER_CONCURRENCY=4",
    "LINKCRM_MAX_ATTEMPTS": "set a count, e.g. LINKCRM_MAX_ATTEMPTS=8",
    "LINKCRM_LOG_LEVEL": "set one of DEBUG, INFO, WARNING, ERROR",
    "LINKCRM_TOUCH_RETENTION_DAYS": "set days between 1 and 3650, e.g. "
                                    "LINKCRM_TOUCH_RETENTION_DAYS=90",
}
