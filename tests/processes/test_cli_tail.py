"""``lcbus tail`` prints live events, filtered by type and trace."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import redis

from bus import BusCallbackHandler, Keys, Settings
from bus.keys import ENTRY_FIELD
from tests.support.chains import build_chain
from tests.support.processes import ROOT


def run_tail(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **settings.to_env()}
    return subprocess.run(
        [sys.executable, "-m", "bus.cli", "tail", "--from-start", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_tail_filters_by_trace_and_type(settings: Settings, sync_redis: redis.Redis) -> None:
    handler = BusCallbackHandler(settings=settings)
    wanted, other = uuid.uuid4(), uuid.uuid4()
    for root in (other, wanted):
        build_chain().invoke("q", config={"callbacks": [handler], "run_id": root})
    assert handler.publisher.flush(5)
    sync_redis.xadd(Keys(settings.prefix).events(0), {ENTRY_FIELD: b"not msgpack"})

    result = run_tail(settings, "--trace", str(wanted), "--type", "on_tool", "--limit", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert all(str(wanted)[:8] in line and "word_count" in line for line in lines)
    assert "on_tool_start" in lines[0] and "on_tool_end" in lines[1]
    handler.close()


def test_tail_reports_undecodable_entries(settings: Settings, sync_redis: redis.Redis) -> None:
    sync_redis.xadd(Keys(settings.prefix).events(0), {ENTRY_FIELD: b"not msgpack"})
    handler = BusCallbackHandler(settings=settings)
    build_chain().invoke("q", config={"callbacks": [handler]})
    assert handler.publisher.flush(5)
    result = run_tail(settings, "--limit", "1")
    assert result.returncode == 0
    assert "undecodable" in result.stderr
    assert len(result.stdout.splitlines()) == 1
    handler.close()


def test_every_command_has_help() -> None:
    from bus.cli import COMMAND_MODULES

    for name in ("", *COMMAND_MODULES):
        args = [name, "--help"] if name else ["--help"]
        result = subprocess.run(
            [sys.executable, "-m", "bus.cli", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=30,
            check=False,
        )
        assert result.returncode == 0 and "usage: lcbus" in result.stdout, (name, result.stderr)
