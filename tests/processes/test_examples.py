"""The README's examples (``examples/``) run as written against the real Redis, the three
workers and a frontend, each started from its command line; each is in the README verbatim."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
import redis.asyncio as aioredis
from standardwebhooks.webhooks import Webhook

from bus.settings import Settings
from bus.webhooks.endpoints import Endpoints
from tests.conftest import REDIS_URL, require_redis
from tests.support.frontend import SECRET, frontend
from tests.support.processes import ROOT, start_worker, stop
from tests.support.waiting import wait_until
from tests.support.webhooks import LOOPBACK, Receiver, start_receiver

EXAMPLES = ROOT / "examples"
WORKERS = ("fanout", "traces", "webhooks")


@dataclass
class Stack:
    settings: Settings
    frontend_url: str
    receiver: Receiver


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_redis()
    prefix = f"lcbus-test-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        redis_url=REDIS_URL,
        prefix=prefix,
        stream_secret=SECRET,
        webhook_allow_networks=LOOPBACK,
    )
    logs = tmp_path_factory.mktemp("logs")
    workers = [
        start_worker(settings, logs / f"{name}.log", target=f"workers.{name}.WorkerSettings")
        for name in WORKERS
    ]
    try:
        with frontend(REDIS_URL, prefix) as server:
            yield from (Stack(settings, server.url, r) for r in start_receiver())
    finally:
        for worker in workers:
            stop(worker, signal.SIGTERM)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def run_example(stack: Stack, name: str, **env: str) -> str:
    """``python examples/NAME`` with the stack's settings; its stdout. Checks the README has it."""
    example = EXAMPLES / name
    assert f"```python\n{example.read_text()}```" in (ROOT / "README.md").read_text(), name
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **stack.settings.to_env(), **env}
    full_env.pop("REDIS_URL", None)
    result = subprocess.run(
        [sys.executable, str(example)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_run_tree_example_reads_the_tree_the_trace_worker_built(stack: Stack) -> None:
    assert run_example(stack, "run_tree.py") == (
        "success [('ChatPromptTemplate', 'prompt'), ('GenericFakeChatModel', 'llm'),"
        " ('StrOutputParser', 'parser')]\n"
    )


def test_sse_example_streams_the_run_through_the_frontend(stack: Stack) -> None:
    out = run_example(stack, "sse_stream.py", FRONTEND_URL=stack.frontend_url)
    assert out == "streamed over the bus\n"


def test_websocket_example_streams_the_thread_through_the_frontend(stack: Stack) -> None:
    out = run_example(stack, "websocket_stream.py", FRONTEND_URL=stack.frontend_url)
    assert out == "one socket per thread\n"


def test_webhooks_example_gets_one_signed_llm_end(stack: Stack) -> None:
    name = f"example-{uuid.uuid4().hex[:8]}"
    endpoint_id = run_example(stack, "webhooks.py", WEBHOOK_URL=stack.receiver.url(name)).strip()
    wait_until(lambda: stack.receiver.received(name), what="the webhook arrived")
    secret = asyncio.run(_secret(stack.settings, endpoint_id))
    [request] = stack.receiver.received(name)
    body = Webhook(secret).verify(request["body"], request["headers"])
    assert body["type"] == "llm.end"
    assert body["data"]["text"] == "hi there"
    assert json.loads(request["body"])["data"]["name"] == "GenericFakeChatModel"


async def _secret(settings: Settings, endpoint_id: str) -> str:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        endpoint = await Endpoints(redis=client, settings=settings).get(endpoint_id)
    finally:
        await client.aclose()
    return endpoint.secrets[0].value
