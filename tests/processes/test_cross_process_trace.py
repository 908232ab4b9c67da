"""One trace across two processes over real HTTP: ``trace_headers`` in the parent's tool,
``continue_trace`` in the child service; the trace worker runs from its command line."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import tool

from bus import BusCallbackHandler, Settings, get_trace, stream_token, trace_headers
from bus.demo.ports import free_port
from bus.traces.aggregator import TraceAggregator
from bus.traces.tree import RunNode, Trace
from tests.processes.test_demo import CHROMIUM, IN_CI
from tests.support.frontend import SECRET, frontend
from tests.support.processes import spawn, start_worker, stop, wait_http
from tests.support.published import bus_deliveries
from tests.support.waiting import wait_until

WORKER = "workers.traces.WorkerSettings"


@pytest.fixture
def child_url(settings: Settings) -> Iterator[str]:
    port = free_port()
    env = settings.to_env()
    service = spawn(["-m", "tests.support.child_service", str(port)], env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(service, signal.SIGTERM)


def shape(node: RunNode) -> list[object]:
    """Each run as (name, run_type, model_type, parent's name), depth first."""
    rows: list[object] = []

    def walk(run: RunNode, parent: RunNode | None) -> None:
        rows.append((run.name, run.run_type, run.model_type, parent.name if parent else None))
        for child in run.children:
            assert child.parent_run_id == run.id
            walk(child, run)

    walk(node, None)
    return rows


def fetch(settings: Settings, trace_id: str) -> Trace | None:
    async def read() -> Trace | None:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            return await get_trace(client, settings, trace_id)
        finally:
            await client.aclose()

    return asyncio.run(read())


def run_parent(settings: Settings, child_url: str, tmp_path: Path) -> str:
    """The parent app: a chain whose tool calls the child service; the trace's id once complete."""

    @tool
    def ask_child(text: str) -> str:
        """Ask the child service to shout the text."""
        answer = httpx.post(
            f"{child_url}/shout", json={"text": text}, headers=trace_headers(), timeout=30
        )
        answer.raise_for_status()
        return str(answer.json()["answer"])

    worker = start_worker(settings, tmp_path / "traces.log", target=WORKER)
    handler = BusCallbackHandler(settings=settings)
    root = uuid.uuid4()
    parent = RunnableLambda(lambda text: ask_child.invoke({"text": text}), name="parent")
    try:
        config: RunnableConfig = {
            "callbacks": [handler],
            "run_id": root,
            "metadata": {"thread_id": "th-1"},
        }
        assert parent.invoke("over the wire", config) == "OVER THE WIRE"
        assert handler.publisher.flush(5)
        wait_until(
            lambda: (found := fetch(settings, str(root))) is not None and found.completed,
            what="the trace completed",
        )
    finally:
        handler.close()
        stop(worker, signal.SIGTERM)
    return str(root)


EXPECTED_SHAPE = [
    ("parent", "chain", None, None),
    ("ask_child", "tool", None, "parent"),
    ("child_pipeline", "chain", None, "ask_child"),
    ("ChatPromptTemplate", "prompt", None, "child_pipeline"),
    ("GenericFakeChatModel", "llm", "chat", "child_pipeline"),
    ("StrOutputParser", "parser", None, "child_pipeline"),
]


def test_a_child_process_run_lands_under_its_parent_and_the_trace_completes(
    settings: Settings, child_url: str, tmp_path: Path
) -> None:
    root = run_parent(settings, child_url, tmp_path)
    trace = fetch(settings, root)
    assert trace is not None and trace.root is not None
    assert (trace.status, trace.orphans, trace.open_runs, trace.run_count) == ("success", [], 0, 6)
    assert shape(trace.root) == EXPECTED_SHAPE
    child = trace.root.children[0].children[0]
    assert child.metadata == {"lcbus_trace_id": root, "thread_id": "th-1"}
    assert trace.root.children[0].outputs == {"output": "OVER THE WIRE"}


def test_child_service_refuses_malformed_trace_headers(child_url: str) -> None:
    headers = {"lcbus-trace-id": "not-a-uuid", "lcbus-parent-run-id": str(uuid.uuid4())}
    answer = httpx.post(f"{child_url}/shout", json={"text": "x"}, headers=headers, timeout=30)
    assert answer.status_code == 400
    assert answer.json() == {"error": "lcbus-trace-id is not a run id (a UUID): 'not-a-uuid'"}


def waterfall(settings: Settings, trace_id: str, rows: int) -> list[list[str]]:
    """The page's waterfall for the trace once it has ``rows`` rows: label, indent, bar
    class and note (with the duration replaced by ``MS``), read in Chromium."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "CI must install Chromium (.ci/run does)"
    token = stream_token(trace_id, secret=SECRET)
    env = {"LCBUS_PARTITIONS": str(settings.partitions)}
    with frontend(settings.redis_url, settings.prefix, **env) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{server.url}/?trace={trace_id}&token={token}")
        page.wait_for_function(f"document.querySelectorAll('#waterfall .row').length >= {rows}")
        found: list[list[str]] = page.eval_on_selector_all(
            "#waterfall .row",
            "rows => rows.map(r => [r.querySelector('.label').textContent,"
            " r.querySelector('.label').style.paddingLeft, r.querySelector('.bar').className,"
            " r.querySelector('.bar span').textContent.replace(/^[0-9.]+ ms/, 'MS')])",
        )
        browser.close()
    return found


@pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason="Chromium is not installed")
def test_the_page_draws_the_child_runs_under_the_parent(
    settings: Settings, child_url: str, tmp_path: Path
) -> None:
    root = run_parent(settings, child_url, tmp_path)
    assert waterfall(settings, root, 6) == [
        ["parent", "0px", "bar chain", "MS"],
        ["ask_child", "14px", "bar tool", "MS"],
        ["child_pipeline", "28px", "bar chain", "MS"],
        ["ChatPromptTemplate", "42px", "bar prompt", "MS"],
        # The fake model reports no usage: unknown, not "0 tok".
        ["GenericFakeChatModel", "42px", "bar llm", "MS · tokens unknown"],
        ["StrOutputParser", "42px", "bar parser", "MS"],
    ]


@pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason="Chromium is not installed")
def test_the_page_draws_runs_whose_parent_is_not_on_the_bus(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    """A run naming the trace but not its parent run (metadata only) is an orphan: still drawn."""
    parent_handler, other_handler = (BusCallbackHandler(settings=settings) for _ in range(2))
    root = uuid.uuid4()

    def step(text: str) -> str:
        config: RunnableConfig = {
            "callbacks": [other_handler],
            "metadata": {"lcbus_trace_id": str(root)},
        }
        return str(RunnableLambda(str.upper, name="elsewhere").invoke(text, config))

    parent = RunnableLambda(step, name="parent")
    assert parent.invoke("x", {"callbacks": [parent_handler], "run_id": root}) == "X"
    for handler in (parent_handler, other_handler):
        assert handler.publisher.flush(5)
        handler.close()
    asyncio.run(_aggregate(settings, sync_redis))
    assert waterfall(settings, str(root), 2) == [
        ["parent", "0px", "bar chain", "MS"],
        ["elsewhere", "0px", "bar chain", "MS"],
    ]


async def _aggregate(settings: Settings, sync_redis: redis.Redis) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        await TraceAggregator(redis=client, settings=settings)(bus_deliveries(sync_redis, settings))
    finally:
        await client.aclose()
