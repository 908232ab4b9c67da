"""Settings: environment mapping, validation, round trip to child processes."""

from __future__ import annotations

import pytest

from bus import Settings
from bus.errors import ConfigError


def test_from_env_reads_prefixed_variables_and_redis_url() -> None:
    env = {
        "REDIS_URL": "redis://h:1/2",
        "LCBUS_PARTITIONS": "3",
        "LCBUS_OPEN_ACCESS": "yes",
        "LCBUS_FLUSH_INTERVAL_MS": "1.5",
        "LCBUS_DROP_POLICY": "newest",
    }
    settings = Settings.from_env(env)
    assert settings.redis_url == "redis://h:1/2"
    assert (settings.partitions, settings.open_access, settings.flush_interval_ms) == (3, True, 1.5)
    assert settings.drop_policy == "newest"


def test_lcbus_redis_url_wins_over_redis_url() -> None:
    env = {"REDIS_URL": "redis://a/0", "LCBUS_REDIS_URL": "redis://b/0"}
    assert Settings.from_env(env).redis_url == "redis://b/0"


def test_to_env_round_trips() -> None:
    settings = Settings(prefix="p", partitions=5, open_access=True, stream_secret="s")
    assert Settings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LCBUS_PARTITIONS": "many"}, "LCBUS_PARTITIONS='many' is not a valid int"),
        ({"LCBUS_PARTITIONS": "0"}, "partitions must be >= 1"),
        ({"LCBUS_PREFIX": "a{b}"}, "prefix"),
        ({"LCBUS_DROP_POLICY": "random"}, "drop_policy"),
    ],
)
def test_bad_values_get_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


def test_readme_documents_every_setting() -> None:
    from bus.settings import env_fields
    from tests.support.processes import ROOT

    readme = (ROOT / "README.md").read_text()
    missing = [name for name, _, _ in env_fields() if f"`{name}`" not in readme]
    assert missing == [], f"README's configuration table lacks {missing}"
