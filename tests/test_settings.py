"""Settings: each default and its environment variable written once, read by pydantic-settings."""

from __future__ import annotations

import pytest

from actgen_shared.settings import ENV, Settings


def test_every_field_has_its_variable_and_the_old_names_stay() -> None:
    assert set(ENV) == set(Settings.model_fields)
    assert ENV["redis_url"] == "REDIS_URL"
    assert ENV["heartbeat_interval_s"] == "ACTGEN_HEARTBEAT_S"
    assert ENV["max_wait_s"] == "ACTGEN_MAX_WAIT_S"
    assert ENV["results_stream_maxlen"] == "ACTGEN_RESULTS_STREAM_MAXLEN"


def test_from_env_reads_the_variables_and_skips_empty_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/1")
    monkeypatch.setenv("ACTGEN_HEARTBEAT_S", "2.5")
    monkeypatch.setenv("ACTGEN_PUBLIC_DOCS", "yes")
    monkeypatch.setenv("ACTGEN_RESULTS_STREAM_MAXLEN", "500")
    monkeypatch.setenv("ACTGEN_MAX_BATCH", "")
    settings = Settings.from_env()
    assert settings.redis_url == "redis://example:6379/1"
    assert settings.heartbeat_interval_s == 2.5
    assert settings.public_docs is True
    assert settings.results_stream_maxlen == 500
    assert settings.max_batch == Settings.model_fields["max_batch"].default


def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTGEN_HEARTBEAT_S", "often")
    with pytest.raises(ValueError, match="ACTGEN_HEARTBEAT_S"):
        Settings.from_env()


def test_settings_are_immutable_and_copied_with_changes() -> None:
    settings = Settings(redis_url="redis://a", lease_s=2.0)
    with pytest.raises(ValueError):
        settings.lease_s = 3.0  # type: ignore[misc]
    changed = settings.model_copy(update={"redis_url": "redis://b"})
    assert (changed.redis_url, changed.lease_s, settings.redis_url) == ("redis://b", 2.0, "redis://a")
