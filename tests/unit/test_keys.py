"""Field names in Lua scripts come from bus.keys."""

import pytest

from bus.keys import lua_fields


def test_lua_fields_fills_every_placeholder() -> None:
    script = "redis.call('HSET', KEYS[1], '$VERSION', 1, '$BLOB', ARGV[1], '$SUMMARY', ARGV[2])"
    assert lua_fields(script) == "redis.call('HSET', KEYS[1], 'v', 1, 's', ARGV[1], 'm', ARGV[2])"
    assert lua_fields("'$ENTRY' '$SEQ' '$CHANNEL' '$FINAL' '$PAYLOAD'") == "'e' 's' 'm' 'f' 'p'"


def test_lua_fields_refuses_an_unknown_placeholder() -> None:
    with pytest.raises(KeyError, match="VERSOIN"):
        lua_fields("redis.call('HGET', KEYS[1], '$VERSOIN')")
