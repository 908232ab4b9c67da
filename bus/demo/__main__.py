"""``python -m bus.demo``: the whole bus, end to end, on one machine.

Starts (unless ``REDIS_URL`` is set) an embedded Redis-protocol server in a
process of its own (:mod:`bus.demo.embedded`), then as separate processes:
the three workers from their arq command lines, a frontend, a local
OpenAI-compatible model server and a webhook receiver that verifies every
signature. Registers the receiver for
``llm.end``, ``tool.end`` and ``trace.completed``, connects an SSE client
through the frontend, and runs a LangChain app (``ChatOpenAI`` streaming, a
prompt, a retriever and a tool) with the bus handler. Prints tokens as they
arrive, then a summary: token latency, webhooks verified, the trace tree.

The last line is one JSON object; the exit status is 0 only when every check
passed. ``--serve`` keeps everything running for the browser page.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from bus.demo.app import build_tool_chain, openai_model
from bus.demo.client import StreamWatcher, fetch_json, render_tree, wait_for_deliveries
from bus.demo.embedded import EmbeddedRedis
from bus.demo.openai_server import DEFAULT_ANSWER
from bus.demo.ports import free_port
from bus.demo.stack import DemoError, Stack
from bus.keys import Keys
from bus.producer.callbacks import BusCallbackHandler
from bus.settings import Settings
from bus.tokens import stream_token
from bus.webhooks.endpoints import Endpoints, new_secret

WEBHOOK_TYPES = ("llm.end", "tool.end", "trace.completed")
QUESTION = "How do redis and langchain work together?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bus.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--serve", action="store_true", help="keep everything running for the browser page"
    )
    parser.add_argument("--port", type=int, default=0, help="frontend port (default: a free one)")
    parser.add_argument(
        "--openai",
        action="store_true",
        help="use the real OpenAI API (needs OPENAI_API_KEY) instead of the local model server",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each stage"
    )
    parser.add_argument(
        "--token-delay", type=float, default=0.01, help="seconds between the local model's tokens"
    )
    return parser.parse_args(argv)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the ExitStack: every process is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    result: dict[str, Any] = {"ok": False}
    log_dir = Path(tempfile.mkdtemp(prefix="lcbus-demo-"))
    try:
        with ExitStack() as stack:
            result = run(args, stack, log_dir)
    except (DemoError, redis.RedisError, OSError) as exc:
        result = {"ok": False, "reason": f"{type(exc).__name__}: {exc}", "logs": str(log_dir)}
        print(f"\ndemo failed: {result['reason']}\nprocess logs: {log_dir}", file=sys.stderr)
    except KeyboardInterrupt:
        result = {"ok": result.get("ok", False), "reason": "interrupted"}
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


def demo_settings(url: str) -> Settings:
    return Settings.from_env(
        redis_url=url,
        prefix=f"lcbus-demo-{uuid.uuid4().hex[:6]}",
        stream_secret=secrets.token_urlsafe(24),
        admin_token=secrets.token_urlsafe(24),
        # The receiver runs on loopback, which the SSRF guard refuses unless allowed.
        webhook_allow_networks="127.0.0.0/8,::1/128",
        webhook_schedule="0,1,2,5",
        read_block_ms=1000,
        trace_complete_timeout_s=30.0,
    )


def run(args: argparse.Namespace, stack: ExitStack, log_dir: Path) -> dict[str, Any]:
    url = os.environ.get("LCBUS_REDIS_URL") or os.environ.get("REDIS_URL")
    embedded: EmbeddedRedis | None = None
    if not url:
        embedded = EmbeddedRedis(log=log_dir / "redis.log")
        url = stack.enter_context(embedded)
    if args.openai and not os.environ.get("OPENAI_API_KEY"):
        raise DemoError("--openai needs OPENAI_API_KEY")
    settings = demo_settings(url)
    stack.callback(cleanup, settings)
    where = "embedded fakeredis" if embedded is not None else "REDIS_URL"
    print(f"redis    {url} ({where}), prefix {settings.prefix}")
    procs = stack.enter_context(Stack(settings, log_dir=log_dir))
    ports = {"frontend": args.port or free_port(), "receiver": free_port(), "openai": free_port()}
    openai_url = None if args.openai else f"http://127.0.0.1:{ports['openai']}/v1"
    secret = new_secret()
    endpoint_id = asyncio.run(
        register_endpoint(settings, f"http://127.0.0.1:{ports['receiver']}/hook", secret)
    )

    if openai_url:
        procs.spawn(
            "openai",
            [
                "-m",
                "bus.demo.openai_server",
                "--port",
                str(ports["openai"]),
                "--delay",
                str(args.token_delay),
            ],
        )
    procs.spawn(
        "receiver",
        ["-m", "bus.demo.receiver", "--port", str(ports["receiver"]), "--secret", secret],
    )
    procs.start_workers()
    procs.spawn(
        "frontend",
        ["-m", "bus.demo.frontend", "--port", str(ports["frontend"])],
        env={"LCBUS_DEMO_OPENAI_URL": openai_url or "", "LCBUS_DEMO_ENDPOINT_ID": endpoint_id},
    )
    base = f"http://127.0.0.1:{ports['frontend']}"
    procs.wait_http("frontend", f"{base}/healthz", args.timeout)
    procs.wait_http(
        "webhook receiver", f"http://127.0.0.1:{ports['receiver']}/healthz", args.timeout
    )
    if openai_url:
        procs.wait_http("model server", f"http://127.0.0.1:{ports['openai']}/healthz", args.timeout)
    procs.wait_workers(args.timeout)
    print(f"started  fanout, traces and webhooks workers, frontend {base}, receiver, model server")

    # The embedded server's process is stopped last, after the processes using it.
    pids = procs.pids()
    if embedded is not None and embedded.pid:
        pids.append(embedded.pid)
    if args.serve:
        return serve(base, procs, pids)
    return run_once(settings, base, openai_url, ports["receiver"], args.timeout, pids)


async def register_endpoint(settings: Settings, url: str, secret: str) -> str:
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        endpoint = await Endpoints(redis=client, settings=settings).add(
            url, events=WEBHOOK_TYPES, secret=secret, description="demo receiver"
        )
    finally:
        await client.aclose()
    return endpoint.id


def run_once(
    settings: Settings,
    base: str,
    openai_url: str | None,
    receiver_port: int,
    timeout: float,
    pids: list[int],
) -> dict[str, Any]:
    root = uuid.uuid4()
    token = stream_token(str(root), secret=settings.stream_secret)
    watcher = StreamWatcher(f"{base}/traces/{root}/stream", token)
    watcher.start()  # connected before the run starts: tokens arrive live
    handler = BusCallbackHandler(settings=settings)
    chain = build_tool_chain(
        openai_model(openai_url, api_key=os.environ.get("OPENAI_API_KEY", "local"))
    )
    started = time.time()
    answer = chain.invoke(
        QUESTION, config={"callbacks": [handler], "run_id": root, "metadata": {"demo": True}}
    )
    handler.close()
    stream = watcher.wait(timeout)
    print()
    deliveries = wait_for_deliveries(
        f"http://127.0.0.1:{receiver_port}/deliveries", len(WEBHOOK_TYPES) + 1, timeout
    )
    trace = fetch_json(
        f"{base}/traces/{root}", settings.admin_token, until_complete=True, timeout=timeout
    )
    print(render_tree(trace))
    verified = [d for d in deliveries if d.get("verified")]
    types = sorted({str(d.get("type")) for d in verified})
    checks = {
        "answer matches the model": answer == DEFAULT_ANSWER if openai_url else bool(answer),
        "stream text matches the answer": stream.text == answer,
        "stream ended with the trace": stream.ended,
        "no duplicate or missing events": stream.contiguous,
        "webhooks verified for every type": set(WEBHOOK_TYPES) <= set(types),
        "no webhook failed verification": len(verified) == len(deliveries),
        "trace complete": bool(trace and trace.get("completed")),
        "no events dropped by the publisher": handler.publisher.stats.dropped == 0,
    }
    print_summary(stream, verified, trace, checks, time.time() - started)
    return {
        "ok": all(checks.values()),
        "tokens": stream.tokens,
        "token_latency_p50_ms": stream.latency_ms(50),
        "token_latency_p99_ms": stream.latency_ms(99),
        "events": stream.events,
        "webhooks_verified": len(verified),
        "webhook_types": types,
        "trace_runs": count_runs(trace.get("root") if trace else None),
        "trace_status": trace.get("status") if trace else None,
        "failed_checks": [name for name, passed in checks.items() if not passed],
        "pids": pids,
    }


def count_runs(node: dict[str, Any] | None) -> int:
    if not node:
        return 0
    return 1 + sum(count_runs(child) for child in node.get("children", []))


def print_summary(
    stream: StreamWatcher,
    verified: list[dict[str, Any]],
    trace: dict[str, Any] | None,
    checks: dict[str, bool],
    elapsed: float,
) -> None:
    print("summary")
    print(
        f"  tokens streamed   {stream.tokens} in {stream.events} protocol events; "
        f"latency app -> browser p50 {stream.latency_ms(50)} ms, p99 {stream.latency_ms(99)} ms"
    )
    kinds = ", ".join(f"{t} x{sum(d.get('type') == t for d in verified)}" for t in WEBHOOK_TYPES)
    print(f"  webhooks verified {len(verified)} ({kinds})")
    if trace:
        usage = trace.get("usage") or {}
        total = usage.get("total_tokens")  # None: the model did not report usage
        print(
            f"  trace             {trace.get('status')}, {count_runs(trace.get('root'))} runs, "
            f"{trace.get('model_calls')} model calls, {'?' if total is None else total} tokens, "
            f"{trace.get('latency_ms') or 0:.1f} ms"
        )
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    print(f"  elapsed           {elapsed:.2f} s")


def serve(base: str, procs: Stack, pids: list[int]) -> dict[str, Any]:
    print(f"\nopen {base}/ in a browser (Ctrl-C stops everything)", flush=True)
    try:
        while all(p.poll() is None for p in procs.processes.values()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        return {"ok": True, "served": base, "pids": pids}
    dead = [n for n, p in procs.processes.items() if p.poll() is not None]
    raise DemoError(f"{', '.join(dead)} stopped")


def cleanup(settings: Settings) -> None:
    """Remove the demo's keys (it may run on a shared Redis)."""
    try:
        client = redis.Redis.from_url(settings.redis_url)
        keys = list(
            client.scan_iter(
                match=Keys(settings.prefix, settings.partitions).all_keys_pattern(), count=1000
            )
        )
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        client.close()
    except redis.RedisError:
        pass


if __name__ == "__main__":
    sys.exit(main())
