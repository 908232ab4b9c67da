"""LangGraph's Python SDK reads a LangGraph agent's run off the bus, unchanged.

The app (this process) runs a ReAct agent with a subgraph and a tool, with
``BusCallbackHandler`` attached; two fan-out worker processes and a trace
worker process consume the events; two frontend processes serve them behind a
TCP balancer. ``langgraph_sdk``'s ``client.threads.stream(...)``, and
``@langchain/langgraph-sdk``'s through node (``tests/js``), read the thread
over SSE and over WebSocket while the frontend they are connected to is
killed mid-answer and restarted: every projection still gets exactly what the
app produced, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from langchain_core.messages import HumanMessage
from langgraph_sdk import get_client

from bus.history import Topic
from bus.keys import HISTORY_CHANNEL, HISTORY_SEQ, Keys
from bus.producer.callbacks import BusCallbackHandler
from bus.settings import Settings
from bus.tokens import stream_token, thread_token
from tests.conftest import IN_CI, REDIS_URL, require_redis
from tests.support.agent import ANSWER, NOTES, TOOL_CALL_ID, TOOL_INPUT, build_agent
from tests.support.frontend import SECRET, Frontend, frontend
from tests.support.processes import ROOT, start_worker, stop
from tests.support.protocol import history, validate
from tests.support.proxy import Balancer
from tests.support.waiting import wait_until_async

FANOUT = "workers.fanout.WorkerSettings"
TRACE_WORKER = "workers.traces.WorkerSettings"
CHANNELS = ["messages", "tools", "lifecycle", "custom", "tasks"]


@dataclass
class Stack:
    settings: Settings
    frontends: list[Frontend]
    ports: list[int]
    exits: contextlib.ExitStack
    restarted: list[Frontend] = field(default_factory=list)

    def restart(self, index: int) -> None:
        """SIGKILL frontend ``index``, then start it again on its port."""
        self.frontends[index].process.send_signal(signal.SIGKILL)
        self.frontends[index].process.wait(timeout=10)
        fresh = self.exits.enter_context(_frontend(self.settings, port=self.ports[index]))
        self.frontends[index] = fresh


def _frontend(settings: Settings, port: int = 0) -> contextlib.AbstractContextManager[Frontend]:
    env = {"LCBUS_PARTITIONS": str(settings.partitions)}
    return frontend(settings.redis_url, settings.prefix, port=port, **env)


@pytest.fixture(scope="module")
def module_prefix() -> Iterator[str]:
    require_redis()
    name = f"lcbus-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


@pytest.fixture(scope="module")
def stack(module_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two fan-out workers, a trace worker and two frontends, shared by this module's tests
    (each test uses its own thread)."""
    settings = Settings(
        redis_url=REDIS_URL,
        prefix=module_prefix,
        partitions=4,
        stream_secret=SECRET,
        read_block_ms=200,
    )
    tmp_path = tmp_path_factory.mktemp("sdk-stack")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        # Stopped whatever fails after they start (a frontend that does not come up).
        for log, target in [("fanout-a", FANOUT), ("fanout-b", FANOUT), ("traces", TRACE_WORKER)]:
            workers.append(start_worker(settings, tmp_path / f"{log}.log", target=target))
        with contextlib.ExitStack() as exits:
            fronts = [exits.enter_context(_frontend(settings)) for _ in range(2)]
            ports = [int(f.url.rsplit(":", 1)[1]) for f in fronts]
            yield Stack(settings, fronts, ports, exits)
    finally:
        for worker in workers:
            try:
                stop(worker, signal.SIGTERM)
            except subprocess.TimeoutExpired:
                stop(worker, signal.SIGKILL)


@dataclass
class Seen:
    """What the SDK's projections gave, in order."""

    messages: list[tuple[list[str], str | None, str]] = field(default_factory=list)
    tool_calls: list[tuple[str, str, Any, Any]] = field(default_factory=list)
    subgraphs: list[tuple[list[str], str | None, list[str]]] = field(default_factory=list)
    progress: list[Any] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


# A message's text (a tool call's output) completes as the projection's loop feeds
# it later events, so it is awaited beside the loop, never inside it.


async def _texts(messages: Any) -> list[tuple[list[str], str | None, str]]:
    async def read(message: Any) -> tuple[list[str], str | None, str]:
        return message.namespace, message.node, await message.text

    return list(await asyncio.gather(*[asyncio.create_task(read(m)) async for m in messages]))


async def _messages(thread: Any, seen: Seen) -> None:
    seen.messages = await _texts(thread.messages)


async def _tool_calls(thread: Any, seen: Seen) -> None:
    async def read(call: Any) -> tuple[str, str, Any, Any]:
        return call.tool_call_id, call.name, call.input, await call.output

    calls = [asyncio.create_task(read(call)) async for call in thread.tool_calls]
    seen.tool_calls = list(await asyncio.gather(*calls))


async def _subgraphs(thread: Any, seen: Seen) -> None:
    async def read(sub: Any) -> tuple[list[str], str | None, list[str]]:
        texts = [text for _, _, text in await _texts(sub.messages)]
        return sub.namespace, sub.graph_name, texts

    subs = [asyncio.create_task(read(sub)) async for sub in thread.subgraphs]
    seen.subgraphs = list(await asyncio.gather(*subs))


async def _extensions(thread: Any, seen: Seen) -> None:
    async for item in thread.extensions["progress"]:
        seen.progress.append(item)


async def _raw(thread: Any, seen: Seen) -> None:
    async for event in thread.subscribe(CHANNELS):
        seen.events.append(event)


@contextlib.asynccontextmanager
async def reading(
    url: str, thread_id: str, token: str, transport: str, history_tail: Any = None
) -> AsyncIterator[Seen]:
    """Open the SDK's thread stream and read every projection until the run ends."""
    auth = {"Authorization": f"Bearer {token}"}
    client = get_client(url=url, headers=auth)
    seen = Seen()
    # The WebSocket handshake carries the stream's own headers (the client's go on HTTP).
    opened = client.threads.stream(
        thread_id, assistant_id="agent", headers=auth, transport=transport
    )
    async with opened as t:
        readers = [
            asyncio.create_task(reader(t, seen))
            for reader in (_messages, _tool_calls, _subgraphs, _extensions, _raw)
        ]
        yield seen
        _, pending = await asyncio.wait(readers, timeout=30)
        for reader in pending:
            reader.cancel()
        got = [(e["seq"], e["method"], e["params"]["data"].get("event")) for e in seen.events]
        tail = history_tail() if history_tail is not None else None
        assert not pending, f"projections open; got {got[-2:]} of {len(got)}, history ends {tail}"
        for reader in readers:
            reader.result()


async def _run_agent(settings: Settings, thread_id: str, hold: asyncio.Event) -> str:
    handler = BusCallbackHandler(settings=settings)
    run_id = uuid.uuid4()
    config: Any = {
        "callbacks": [handler],
        "run_id": run_id,
        "configurable": {"thread_id": thread_id},
    }
    try:
        result = await build_agent(hold).ainvoke({"messages": [HumanMessage("count")]}, config)
        assert result["messages"][-1].content == ANSWER
        handler.publisher.flush()
    finally:
        handler.close()
    return str(run_id)


def _sdk_read_answer_start(seen: Seen) -> bool:
    """Whether the SDK's stream has given the first words of the answer."""
    return any(
        e["method"] == "messages"
        and not e["params"]["namespace"]
        and e["params"]["data"].get("event") == "content-block-delta"
        and e["params"]["data"]["delta"].get("text") == "The"
        for e in seen.events
    )


def _history_tail(client: redis.Redis, settings: Settings, thread_id: str) -> list[Any]:
    """The last entries of the thread's history: (seq, channel) (for failure messages)."""
    entries: Any = client.xrevrange(
        Topic("thread", thread_id).history(Keys(settings.prefix)), count=4
    )
    return [(int(f[HISTORY_SEQ]), f[HISTORY_CHANNEL].decode()) for _, f in reversed(entries)]


def _assert_read_everything(seen: Seen, run_id: str) -> None:
    [(sub_ns, graph_name, sub_texts)] = seen.subgraphs
    assert len(sub_ns) == 1 and sub_ns[0].startswith("research:")
    assert (graph_name, sub_texts) == ("research", [NOTES])
    assert seen.messages == [([], "model", ""), ([], "model", ANSWER)]
    [(call_id, name, call_input, output)] = seen.tool_calls
    assert (call_id, name, call_input) == (TOOL_CALL_ID, "word_count", TOOL_INPUT)
    assert (output["type"], output["content"], output["tool_call_id"]) == ("tool", "7", call_id)
    assert seen.progress == [{"name": "progress", "payload": {"step": "researched"}}]
    _assert_events(seen.events, run_id)


def _assert_events(events: list[dict[str, Any]], run_id: str, *, ordered: bool = True) -> None:
    """Every event valid, once, in order (unless not ``ordered``); the root lifecycle
    names the run."""
    ids = [event["event_id"] for event in events]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    if not ordered:
        events = sorted(events, key=lambda event: event["seq"])
    seqs = [event["seq"] for event in events]
    assert seqs == sorted(seqs)
    for event in events:
        validate(event)
    roots = [
        e["params"]["data"]
        for e in events
        if e["method"] == "lifecycle" and not e["params"]["namespace"]
    ]
    assert [(d["event"], d["run_id"]) for d in roots] == [
        ("started", run_id),
        ("completed", run_id),
    ]


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_the_python_sdk_reads_an_agent_run_across_a_frontend_restart(
    stack: Stack, sync_redis: redis.Redis, transport: str
) -> None:
    settings = stack.settings
    thread_id = f"thread-{uuid.uuid4()}"
    token = thread_token(thread_id, secret=SECRET)
    hold = asyncio.Event()
    backends = [("127.0.0.1", port) for port in stack.ports]
    async with Balancer(backends).running() as balancer:
        tail = lambda: _history_tail(sync_redis, settings, thread_id)  # noqa: E731
        async with reading(balancer.url, thread_id, token, transport, tail) as seen:
            run = asyncio.create_task(_run_agent(settings, thread_id, hold))
            # Mid-answer: the SDK has read the answer's first words, the rest is held back.
            # Waiting for the SDK (not for Redis) matters: a projection whose subscription
            # is still being opened when its frontend dies fails for good (the SDK retries
            # only a stream that had been open), which is not the drop this test is about.
            read_answer = lambda: _sdk_read_answer_start(seen)  # noqa: E731
            await wait_until_async(read_answer, within=30, what="the SDK read the first words")
            before = len(balancer.connections)
            await asyncio.to_thread(stack.restart, 0)
            hold.set()
            run_id = await run
        _assert_read_everything(seen, run_id)
    assert len(balancer.connections) > before, "the SDK did not reconnect"


async def test_agent_get_tree_answers_from_the_run_tree(stack: Stack) -> None:
    settings = stack.settings
    thread_id = f"thread-{uuid.uuid4()}"
    hold = asyncio.Event()
    hold.set()
    run_id = await _run_agent(settings, thread_id, hold)
    url = stack.frontends[1].url
    headers = {"Authorization": f"Bearer {thread_token(thread_id, secret=SECRET)}"}
    command = {"id": 7, "method": "agent.getTree", "params": {}}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as http:

        async def tree_complete() -> dict[str, Any]:
            for _ in range(200):
                reply = (await http.post(f"/threads/{thread_id}/commands", json=command)).json()
                if reply["type"] == "success" and reply["result"]["tree"]["status"] == "completed":
                    return dict(reply)
                await asyncio.sleep(0.05)
            raise AssertionError(f"no complete tree: {reply}")

        reply = await tree_complete()
        tree = reply["result"]["tree"]
        assert reply["id"] == 7
        assert (tree["namespace"], tree["graph_name"], tree["metadata"]) == (
            [],
            "agent",
            {"run_id": run_id},
        )
        [sub] = tree["children"]
        assert sub["graph_name"] == "researcher" and sub["status"] == "completed"
        assert len(sub["namespace"]) == 1 and sub["namespace"][0].startswith("research:")
        other = stream_token("another-trace", secret=SECRET)
        refused = await http.post(
            f"/threads/{thread_id}/commands",
            json=command,
            headers={"Authorization": f"Bearer {other}"},
        )
        assert refused.status_code == 403
        start = {"id": 8, "method": "run.start", "params": {"assistant_id": "agent", "input": {}}}
        reply = (await http.post(f"/threads/{thread_id}/commands", json=start)).json()
        assert (reply["type"], reply["id"], reply["error"]) == ("error", 8, "not_supported")
        assert "agent server" in reply["message"]


# -- the JavaScript SDK (@langchain/langgraph-sdk, run by node from tests/js) ----------

JS_DIR = ROOT / "tests" / "js"


def _node() -> str:
    """The node binary, with tests/js's locked packages installed (``npm ci``)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node and npm are not installed: the JavaScript SDK test needs them"
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    if not (JS_DIR / "node_modules" / "@langchain" / "langgraph-sdk").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=600)
    return node


async def _js_reader(node: str, url: str, thread_id: str, token: str, transport: str) -> Any:
    """Start ``read_thread.mjs``; return its process once its subscriptions are open."""
    process = await asyncio.create_subprocess_exec(
        node,
        "read_thread.mjs",
        url,
        thread_id,
        token,
        transport,
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    assert json.loads(line) == {"ready": True}, line
    return process


async def _read_lines(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode())


def _js_read_answer_start(lines: list[str]) -> bool:
    """Whether the JS reader has read the answer's first words and the subgraph's message."""
    subgraph_message = any(line.startswith('message subgraph ["research:') for line in lines)
    return subgraph_message and "answer started\n" in lines


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_the_javascript_sdk_reads_an_agent_run_across_a_frontend_restart(
    stack: Stack, sync_redis: redis.Redis, transport: str
) -> None:
    node = _node()
    settings = stack.settings
    thread_id = f"thread-{uuid.uuid4()}"
    token = thread_token(thread_id, secret=SECRET)
    hold = asyncio.Event()
    backends = [("127.0.0.1", port) for port in stack.ports]
    async with Balancer(backends).running() as balancer:
        reader = await _js_reader(node, balancer.url, thread_id, token, transport)
        assert reader.stdout is not None and reader.stderr is not None
        lines: list[str] = []
        progress = asyncio.create_task(_read_lines(reader.stderr, lines))
        try:
            run = asyncio.create_task(_run_agent(settings, thread_id, hold))
            # Mid-answer, once the reader has read the answer's first words and the
            # subgraph's message (a subscription the SDK opens when it sees the subgraph):
            # a subscribe in flight when its socket drops is not re-sent by the SDK, which
            # is not the drop this test is about.
            read_answer = lambda: _js_read_answer_start(lines)  # noqa: E731
            await wait_until_async(read_answer, within=30, what="the reader read the first words")
            before = len(balancer.connections)
            await asyncio.to_thread(stack.restart, 0)
            hold.set()
            run_id = await run
            await asyncio.wait_for(reader.wait(), 45)
        except TimeoutError:
            reader.kill()
            await reader.wait()
            await progress
            log = "".join(lines)
            tail = _history_tail(sync_redis, settings, thread_id)
            message = f"the JS reader did not finish (history ends {tail}):\n{log}"
            raise AssertionError(message) from None
        finally:
            if reader.returncode is None:
                reader.kill()
                await reader.wait()
        await progress
        log = "".join(lines)
        assert reader.returncode == 0, log
        out = await reader.stdout.read()
        got = json.loads(out.decode().strip().splitlines()[-1])
    print(log)  # the reader's progress: pytest shows it when an assertion below fails
    assert len(balancer.connections) > before, "the SDK did not reconnect"
    [[sub_ns, sub_name, sub_texts]] = got["subgraphs"]
    assert len(sub_ns) == 1 and sub_ns[0].startswith("research:")
    assert (sub_name, sub_texts) == ("research", [NOTES])
    # The JavaScript SDK's thread.messages spans every namespace; the Python one is root-only.
    assert got["messages"] == [[sub_ns, NOTES], [[], ""], [[], ANSWER]]
    # thread.toolCalls yields a call when it starts and again when it finishes; the SDK
    # unwraps the ToolMessage to the tool's return value.
    assert got["tool_calls"] == [[TOOL_CALL_ID, "word_count", TOOL_INPUT, "7"]] * 2
    assert got["progress"] == [{"step": "researched"}]
    # After a WebSocket reconnect the JavaScript SDK re-sends every subscription.subscribe
    # at once, and hands each event that arrives to every subscription it matches. The
    # first re-subscription's live events (say seq 21, lifecycle) thus reach the raw
    # subscription before its own replay brings what only it asked for (seq 20, custom).
    # No server can prevent that (it cannot send 20 for a subscription it has not yet
    # been asked for), so over WebSocket that subscription is checked for every event
    # once, not for its order; the projections above are exact either way.
    _assert_events(got["events"], run_id, ordered=transport == "sse")


async def test_consecutive_runs_of_a_thread_reach_its_stream_in_order(stack: Stack) -> None:
    """Two fan-out replicas share the partitions; a thread's runs still never interleave."""
    settings = stack.settings
    thread_id = f"thread-{uuid.uuid4()}"
    hold = asyncio.Event()
    hold.set()
    runs = [await _run_agent(settings, thread_id, hold) for _ in range(3)]
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        for _ in range(400):
            events = await history(client, settings, Topic("thread", thread_id))
            roots = [
                (e["params"]["data"]["event"], e["params"]["data"]["run_id"])
                for e in events
                if e["method"] == "lifecycle" and not e["params"]["namespace"]
            ]
            if len(roots) == 6:
                break
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    # In history order: each run starts after the one before it completed.
    assert roots == [(state, run) for run in runs for state in ("started", "completed")]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
