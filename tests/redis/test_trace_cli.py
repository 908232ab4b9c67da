"""``lcbus trace`` and ``lcbus traces`` against a tree built from real runs."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
import redis.asyncio as aioredis

from bus.cli import main as lcbus
from bus.producer.callbacks import BusCallbackHandler
from bus.settings import Settings
from bus.traces.aggregator import TraceAggregator
from tests.support.published import bus_deliveries
from tests.support.runs import run_scenario


@pytest.fixture
def trace_id(settings: Settings, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> str:
    handler = BusCallbackHandler(redis=sync_redis, settings=settings)
    root = run_scenario(handler)
    assert handler.publisher.flush(5)
    handler.close()

    async def aggregate() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            await TraceAggregator(redis=client, settings=settings)(
                bus_deliveries(sync_redis, settings)
            )
        finally:
            await client.aclose()

    asyncio.run(aggregate())
    monkeypatch.setenv("LCBUS_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("LCBUS_PREFIX", settings.prefix)
    monkeypatch.setenv("LCBUS_PARTITIONS", str(settings.partitions))
    return str(root.id)


def test_trace_prints_the_indented_tree(trace_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert lcbus(["trace", trace_id]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{trace_id}  pipeline  success")
    # The fake model reports no usage: unknown, not 0.
    assert lines[0].endswith("runs 8  model calls 1  tokens ?  errors 1")
    assert lines[1].startswith("  pipeline [chain] success")
    model = next(line for line in lines if "GenericFakeChatModel" in line)
    assert model.startswith("      GenericFakeChatModel [llm chat] success")
    assert model.endswith("  tokens unknown  streamed 5")
    failing = next(line for line in lines if "failing_branch" in line)
    assert "error: ValueError: branch failed on purpose" in failing
    assert lcbus(["trace", "unknown-id"]) == 1


def test_trace_json_and_traces_list(trace_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert lcbus(["trace", trace_id, "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["root"]["id"] == trace_id and tree["run_count"] == 8
    assert lcbus(["traces", "--json", "--status", "success", "--metadata", "user=u1"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [t["trace_id"] for t in page["traces"]] == [trace_id]
    assert lcbus(["traces", "--status", "error"]) == 0
    assert capsys.readouterr().out == ""
    assert lcbus(["traces", "--metadata", "oops"]) == 2
    assert capsys.readouterr().err == "--metadata takes KEY=VALUE, got 'oops'\n"


def test_traces_refuses_a_bad_cursor_and_limit(
    trace_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert lcbus(["traces", "--cursor", "garbage"]) == 2
    assert capsys.readouterr().err == "bad trace list cursor: 'garbage'\n"
    assert lcbus(["traces", "--limit", "0"]) == 2
    assert capsys.readouterr().err == "limit must be between 1 and 1000, got 0\n"
