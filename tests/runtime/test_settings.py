"""Settings from the environment: defaults, parsing, and errors that say what to set."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.runtime.settings import Settings


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite:///linkcrm.db"
    assert settings.webhook_secrets == () and settings.api_keys == ()
    assert settings.rules_dir == Path("rules")
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.request_timeout == 10.0


def test_values_are_read_and_trimmed() -> None:
    settings = Settings.from_env({
        "LINKCRM_DATABASE_URL": "postgresql://db/linkcrm",
        "WEBHOOK_SECRET": "whsec_new, whsec_old",
        "LINKCRM_API_KEYS": "k1,k2",
        "LINKCRM_METRICS_KEY": " scrape-key ",
        "LINKCRM_RULES": "my-rules",
        "LINKCRM_MAX_BODY_BYTES": "2_000_000",
        "LINKCRM_REQUEST_TIMEOUT": "2.5",
        "LINKCRM_LEASE_SECONDS": "90",
        "LINKCRM_LOG_LEVEL": "debug",
    })
    assert settings.webhook_secrets == ("whsec_new", "whsec_old")
    assert settings.api_keys == ("k1", "k2")
    assert settings.metrics_keys == ("scrape-key",)
    assert settings.rules_dir == Path("my-rules")
    assert (settings.max_body_bytes, settings.request_timeout) == (2_000_000, 2.5)
    assert (settings.lease_seconds, settings.log_level) == (90.0, "DEBUG")


def test_secrets_never_appear_in_repr() -> None:
    settings = Settings.from_env({"WEBHOOK_SECRET": "whsec_topsecret", "LINKCRM_API_KEYS": "k9",
                                  "LINKCRM_METRICS_KEY": "scrape-secret"})
    assert "whsec_topsecret" not in repr(settings)
    assert "k9" not in repr(settings)
    assert "scrape-secret" not in repr(settings)


def test_every_bad_value_is_reported_with_its_variable_and_a_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({
            "LINKCRM_MAX_BODY_BYTES": "1MB",
            "LINKCRM_REQUEST_TIMEOUT": "-1",
            "WEBHOOK_SECRET": "whsec_a,,whsec_b",
            "LINKCRM_DATABASE_URL": "linkcrm.db",
        })
    text = str(caught.value)
    for name in ("LINKCRM_MAX_BODY_BYTES", "LINKCRM_REQUEST_TIMEOUT", "WEBHOOK_SECRET",
                 "LINKCRM_DATABASE_URL"):
        assert name in text
    assert "hint:" in text
    assert "whsec_a" not in text


def test_an_empty_variable_counts_as_unset() -> None:
    assert Settings.from_env({"LINKCRM_REQUEST_TIMEOUT": " "}).request_timeout == 10.0


def test_serving_without_a_webhook_secret_says_how_to_set_one() -> None:
    with pytest.raises(ConfigError, match="export WEBHOOK_SECRET="):
        Settings.from_env({}).require_webhook_secret()
    Settings.from_env({"WEBHOOK_SECRET": "whsec_a"}).require_webhook_secret()


def test_the_ui_password_is_a_secret_of_at_least_twelve_characters() -> None:
    assert Settings.from_env({}).ui_password is None
    settings = Settings.from_env({"LINKCRM_UI_PASSWORD": "a long ui password"})
    assert settings.ui_password == "a long ui password"
    assert "a long ui password" not in repr(settings)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"LINKCRM_UI_PASSWORD": "short-pw"})
    text = str(caught.value)
    assert "LINKCRM_UI_PASSWORD is 8 characters long; it needs at least 12" in text
    assert "secrets.token_urlsafe" in text and "short-pw" not in text


@pytest.mark.parametrize(("raw", "days", "error"), [
    ("30", 30, None), ("3650", 3650, None),
    ("0", 90, "LINKCRM_TOUCH_RETENTION_DAYS must be greater than 0, got 0"),
    ("3651", 90, "LINKCRM_TOUCH_RETENTION_DAYS must be at most 3650 days, got 3651"),
    ("a month", 90, "LINKCRM_TOUCH_RETENTION_DAYS must be a whole number, got 'a month'"),
])
def test_touch_retention_days_are_bounded(raw: str, days: int, error: str | None) -> None:
    if error is None:
        assert Settings.from_env({"LINKCRM_TOUCH_RETENTION_DAYS": raw}).touch_retention_days \
            == days
        return
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"LINKCRM_TOUCH_RETENTION_DAYS": raw})
    [problem] = raised.value.problems
    assert problem.message == error
    assert "between 1 and 3650" in problem.hint
