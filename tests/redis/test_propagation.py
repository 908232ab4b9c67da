"""``trace_headers`` and ``continue_trace``: the strings, and what the child's runs become."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from langchain_core.runnables import RunnableConfig, RunnableLambda

from bus import BusCallbackHandler, TraceContextError, continue_trace, trace_headers
from bus import events as ev
from bus.settings import Settings
from tests.support.published import read_all


@pytest.fixture
def handler(settings: Settings) -> Iterator[BusCallbackHandler]:
    bus_handler = BusCallbackHandler(settings=settings)
    yield bus_handler
    bus_handler.close()


def test_no_current_run_or_no_bus_handler_gives_no_headers(handler: BusCallbackHandler) -> None:
    assert trace_headers() == {}
    untraced = RunnableLambda(lambda _: trace_headers(), name="step")
    assert untraced.invoke(None) == {}
    assert untraced.invoke(None, {"callbacks": []}) == {}


def test_headers_name_the_trace_the_current_step_and_the_thread(
    handler: BusCallbackHandler,
) -> None:
    seen: dict[str, object] = {}

    def step(_: object, config: RunnableConfig) -> dict[str, str]:
        seen["step"] = config["callbacks"].parent_run_id  # type: ignore[union-attr]
        return trace_headers()

    inner = RunnableLambda(step, name="inner")
    outer = RunnableLambda(lambda x: inner.invoke(x, None), name="outer")
    root = uuid.uuid4()
    config: RunnableConfig = {
        "callbacks": [handler],
        "run_id": root,
        "metadata": {"thread_id": "t9"},
    }
    assert outer.invoke(None, config) == {
        "lcbus-trace-id": str(root),
        "lcbus-parent-run-id": str(seen["step"]),
        "lcbus-thread-id": "t9",
    }
    assert seen["step"] != root


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"lcbus-trace-id": str(uuid.UUID(int=1))}, "lcbus-parent-run-id is missing"),
        (
            {"lcbus-trace-id": "x", "lcbus-parent-run-id": str(uuid.UUID(int=2))},
            "lcbus-trace-id is not a run id (a UUID): 'x'",
        ),
        (
            {
                "lcbus-trace-id": str(uuid.UUID(int=1)),
                "lcbus-parent-run-id": str(uuid.UUID(int=2)),
                "lcbus-thread-id": "a\nb",
            },
            "lcbus-thread-id must be 1 to 256 printable characters",
        ),
    ],
)
def test_malformed_headers_get_a_clear_error(
    handler: BusCallbackHandler, headers: dict[str, str], message: str
) -> None:
    with pytest.raises(TraceContextError) as raised:
        continue_trace(headers, handler)
    assert str(raised.value).startswith(message)


def test_the_child_runs_join_the_parents_trace_under_the_parent_run(
    settings: Settings, sync_redis: redis.Redis, handler: BusCallbackHandler
) -> None:
    trace_id, parent = uuid.uuid4(), uuid.uuid4()
    headers = {  # as an HTTP server hands them over: any case, other headers too
        "LCBUS-Trace-Id": str(trace_id),
        "Lcbus-Parent-Run-Id": str(parent),
        "lcbus-thread-id": "th",
        "content-type": "application/json",
    }
    child = BusCallbackHandler(settings=settings)  # another process's handler
    with continue_trace(headers, child) as config:
        assert RunnableLambda(lambda x: x + 1, name="child").invoke(1, config) == 2
    # Leaving the block flushed the child's events: they are on the bus already.
    [start, end] = [e for e in read_all(sync_redis, settings) if e.name == "child"]
    assert isinstance(start, ev.ChainStart) and isinstance(end, ev.ChainEnd)
    for event in (start, end):
        assert (event.trace_id, event.parent_run_id) == (str(trace_id), str(parent))
        assert event.metadata == {"lcbus_trace_id": str(trace_id), "thread_id": "th"}
    with continue_trace({"content-type": "text/plain"}, child) as config:
        run = uuid.uuid4()
        RunnableLambda(lambda x: x, name="alone").invoke(1, {**config, "run_id": run})
    [alone, _] = [e for e in read_all(sync_redis, settings) if e.name == "alone"]
    assert (alone.trace_id, alone.parent_run_id, alone.metadata) == (str(run), None, {})
    child.close()
