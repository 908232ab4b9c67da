"""``python -m bus.demo``: run a streaming chain through the bus and show its events.

With no ``REDIS_URL`` an embedded Redis-protocol server is started in this
process; with ``REDIS_URL`` set that Redis is used. The last line printed is
one JSON object; the exit status is 0 only if everything checked out.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from contextlib import ExitStack
from typing import Any

import redis

from bus import BusCallbackHandler, Keys, Settings, decode
from bus import events as ev
from bus.demo.app import ANSWER, build_chain, fake_model
from bus.embedded import EmbeddedRedis


def main() -> int:
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or os.environ.get("LCBUS_REDIS_URL")
        embedded = url is None
        if url is None:
            url = stack.enter_context(EmbeddedRedis())
        settings = Settings.from_env(redis_url=url, prefix=f"lcbus-demo-{uuid.uuid4().hex[:6]}")
        print(
            f"redis: {url} ({'embedded' if embedded else 'REDIS_URL'})  prefix: {settings.prefix}"
        )
        result = run(settings)
        cleanup(settings)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def run(settings: Settings) -> dict[str, object]:
    handler = BusCallbackHandler(settings=settings)
    root = uuid.uuid4()
    started = time.perf_counter()
    print("streaming: ", end="", flush=True)
    for chunk in build_chain(fake_model()).stream(
        "How do redis and langchain work together?", config={"callbacks": [handler], "run_id": root}
    ):
        if "answer" in chunk:
            print(chunk["answer"], end="", flush=True)
    print()
    handler.close()
    elapsed_ms = (time.perf_counter() - started) * 1000
    events = read_events(settings)
    for event in events:
        indent = "  " if event.parent_run_id else ""
        detail = getattr(event, "token", "") or getattr(event, "event_name", "")
        print(f"  #{event.seq:<3} {indent}{ev.event_type(event):<22} {event.name:<22} {detail!r}")
    tokens = "".join(e.token for e in events if isinstance(e, ev.LLMNewToken))
    stats = handler.publisher.stats
    ok = tokens == ANSWER and all(e.trace_id == str(root) for e in events) and stats.dropped == 0
    return {
        "ok": ok,
        "trace_id": str(root),
        "events": len(events),
        "tokens": sum(isinstance(e, ev.LLMNewToken) for e in events),
        "published": stats.published,
        "dropped": stats.dropped,
        "run_ms": round(elapsed_ms, 1),
    }


def read_events(settings: Settings) -> list[ev.Event]:
    client = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.prefix)
    found: list[ev.Event] = []
    for partition in range(settings.partitions):
        entries: Any = client.xrange(keys.events(partition))
        found.extend(decode(fields[b"e"]) for _, fields in entries)
    client.close()
    return sorted(found, key=lambda e: e.seq)


def cleanup(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    for key in client.scan_iter(match=Keys(settings.prefix).all_keys_pattern()):
        client.delete(key)
    client.close()


if __name__ == "__main__":
    sys.exit(main())
