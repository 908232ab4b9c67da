"""Frontend capacity: many SSE clients on one frontend process.

Phase 1, the burst: this process is the app (``BusCallbackHandler``, ``traces``
LLM runs streaming ``rate`` tokens/s each for ``seconds``); a fan-out worker
(arq, from its command line) and one frontend (``lcbus serve``) run beside it.
One second into the runs, ``clients`` SSE clients (split over
``client_procs`` processes) all connect at once, spread evenly over the
traces. Every client must end with every event of its trace, in order, with
the exact text the app sent (the part sent before it connected comes from
history). Token latency is handler call to receipt, for the tokens sent after
the client's stream opened.

Phase 2, idle: ``idle`` clients (over ``idle_procs`` processes) connect to the
same frontend on open, quiet traces; once all are connected the frontend's
RSS and CPU are sampled over ``hold`` seconds; then the runs end and every one
of those clients must complete.

Baseline, same run, same app, worker and client processes: a minimal asyncio
relay of the same live channels (``bench._relay``: no history, no resync, no
per-client queue), so its clients get only what is published after they
connect. ``python -m bench.clients [--clients 1000 --traces 100 --rate 20
--seconds 10 --idle 10000 --hold 10]``; last line JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._support import REDIS_URL, percentile, report, throwaway_prefix
from bench.fanout import _env, _processes, _wait_http
from bus.demo.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096  # bytes of a memory page, for /proc/<pid>/statm


# ---------------------------------------------------------------- process figures


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` now, in MB."""
    resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return round(resident * PAGE / 2**20, 1)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmHWM for {pid}")


def cpu_s(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (clock ticks of 1/100 s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


# ---------------------------------------------------------------- client processes


@dataclass
class ClientGroup:
    """Client processes reading ``urls`` (split evenly), connecting at ``start_at``."""

    procs: list[subprocess.Popen[str]]
    results: list[Path]

    @classmethod
    def start(
        cls, urls: list[str], *, procs: int, start_at: float, env: dict[str, str], at_once: int
    ) -> ClientGroup:
        group = cls([], [])
        for i in range(procs):
            spec = Path(f"/tmp/lcbus-bench-clients-{uuid.uuid4().hex}")
            result = spec.with_suffix(".result")
            part = urls[i::procs]
            spec.write_text(
                json.dumps({"urls": part, "start_at": start_at, "opening_at_once": at_once})
            )
            cmd = [sys.executable, "-m", "bench._sse_clients", str(spec), str(result)]
            group.procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            )
            group.results.append(result)
        return group

    def wait_settled(self) -> int:
        """Until every client process's streams are open or failed; returns how many opened."""
        opened = 0
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            if not line or line[0] != "ready":
                raise RuntimeError("a client process exited before its clients connected")
            opened += int(line[1])
        return opened

    def collect(self, timeout_s: float) -> tuple[list[dict[str, Any]], list[int], list[int]]:
        clients: list[dict[str, Any]] = []
        latencies: list[int] = []
        steady: list[int] = []
        for proc, result in zip(self.procs, self.results, strict=True):
            proc.wait(timeout=timeout_s)
            body = json.loads(result.read_text())
            result.unlink()
            result.with_suffix("").unlink(missing_ok=True)
            clients += body["clients"]
            latencies += body["latencies_ns"]
            steady += body["steady_latencies_ns"]
        return clients, latencies, steady

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- the app


class App:
    """The app side: LLM runs published through the real callback handler."""

    def __init__(self, prefix: str) -> None:
        from bus.producer.callbacks import BusCallbackHandler
        from bus.settings import Settings

        settings = Settings(redis_url=REDIS_URL, prefix=prefix, partitions=4)
        self.handler = BusCallbackHandler(settings=settings)
        self.texts: dict[str, hashlib._Hash] = {}

    def start(self, count: int) -> list[uuid.UUID]:
        runs = [uuid.uuid4() for _ in range(count)]
        for run in runs:
            self.handler.on_llm_start({}, ["hello"], run_id=run)
            self.texts[str(run)] = hashlib.sha256()
        return runs

    def token(self, run: uuid.UUID) -> None:
        text = f"~{time.time_ns()}."
        self.texts[str(run)].update(text.encode())
        self.handler.on_llm_new_token(text, run_id=run)

    def end(self, runs: list[uuid.UUID]) -> None:
        from langchain_core.outputs import LLMResult

        for run in runs:
            self.handler.on_llm_end(LLMResult(generations=[[]]), run_id=run)

    def stream(self, runs: list[uuid.UUID], rate: float, seconds: float) -> None:
        """``rate`` tokens/s on every run for ``seconds``, spread over each period."""

        async def pace() -> None:
            start = time.monotonic()
            sent = 0
            while (elapsed := time.monotonic() - start) < seconds:
                due = int(elapsed * rate * len(runs)) + 1
                while sent < due:
                    self.token(runs[sent % len(runs)])
                    sent += 1
                await asyncio.sleep(0.002)

        asyncio.run(pace())

    def close(self) -> None:
        self.handler.close(timeout=10)


# ---------------------------------------------------------------- one run


@contextlib.contextmanager
def _stack(server: list[str], prefix: str) -> Iterator[tuple[int, dict[str, str]]]:
    """The fan-out worker and the server under test; yields the server's pid and the env."""
    env = _env(prefix)
    worker = [sys.executable, "-m", "arq", "workers.fanout.WorkerSettings"]
    with _processes([server, worker], env) as procs:
        yield procs[0].pid, env


def run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    if kind == "bus":
        server = [
            sys.executable,
            "-m",
            "bus.cli",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        health = f"http://127.0.0.1:{port}/healthz"
    else:
        server = [sys.executable, "-m", "bench._relay", str(port)]
        health = f"http://127.0.0.1:{port}/healthz"
    with throwaway_prefix(f"clients-{kind}") as prefix, _stack(server, prefix) as (pid, env):
        _wait_http(health)
        app = App(prefix)
        try:
            cpu0 = cpu_s(pid)
            burst = _burst(app, port, env, args)
            burst["rss_mb"] = peak_rss_mb(pid)
            # CPU seconds per delivered token event: less noisy than latency on a busy host.
            burst["cpu_s"] = round(cpu_s(pid) - cpu0, 2)
            idle = _idle(app, port, env, pid, args) if args.idle else {}
        finally:
            app.close()
    return {**burst, **idle}


def _url(port: int, run: uuid.UUID) -> str:
    return f"http://127.0.0.1:{port}/traces/{run}/stream"


def _burst(app: App, port: int, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    runs = app.start(args.traces)
    urls = [_url(port, runs[i % len(runs)]) for i in range(args.clients)]
    # Client processes take a moment to import: they connect together at start_at,
    # one second into the runs.
    start_at = time.time() + 3.0
    group = ClientGroup.start(
        urls, procs=args.client_procs, start_at=start_at, env=env, at_once=len(urls)
    )
    try:
        time.sleep(max(0.0, start_at - 1.0 - time.time()))
        app.stream(runs, args.rate, args.seconds)
        app.end(runs)
        clients, latencies, steady = group.collect(timeout_s=120)
    finally:
        group.kill()
    return _summary(app, clients, latencies, steady)


def _summary(
    app: App, clients: list[dict[str, Any]], latencies: list[int], steady: list[int]
) -> dict[str, Any]:
    exact = 0
    for client in clients:
        trace = client["url"].split("/")[-2]
        complete = client["ended"] and client["seq_ok"] and not client["error"]
        if complete and client["text_sha256"] == app.texts[trace].hexdigest():
            exact += 1
    errors = sorted({c["error"] for c in clients if c["error"]})
    ms = [lat / 1e6 for lat in latencies]
    steady_ms = [lat / 1e6 for lat in steady]
    return {
        "clients": len(clients),
        "completed": sum(1 for c in clients if c["ended"] and not c["error"]),
        "exact": exact,
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms, default=float("nan")), 1),
        "tokens_measured": len(ms),
        # Past the burst (tokens sent 2 s or more after the client's stream opened).
        # null, not NaN (not JSON), on a run too short to have a steady part.
        "steady_p50_ms": round(percentile(steady_ms, 50), 1) if steady_ms else None,
        "steady_p99_ms": round(percentile(steady_ms, 99), 1) if steady_ms else None,
        "resumes": sum(c["resumes"] for c in clients),
        "errors": errors[:3],
    }


def _idle(
    app: App, port: int, env: dict[str, str], pid: int, args: argparse.Namespace
) -> dict[str, Any]:
    runs = app.start(args.traces)
    for run in runs * 2:  # a couple of tokens each, read from history on connect
        app.token(run)
    urls = [_url(port, runs[i % len(runs)]) for i in range(args.idle)]
    group = ClientGroup.start(
        urls, procs=args.idle_procs, start_at=time.time() + 2.0, env=env, at_once=args.opening
    )
    try:
        t0 = time.monotonic()
        opened = group.wait_settled()
        connect_s = time.monotonic() - t0
        cpu0, wall0 = cpu_s(pid), time.monotonic()
        time.sleep(args.hold)
        cpu_pct = 100 * (cpu_s(pid) - cpu0) / (time.monotonic() - wall0)
        rss = rss_mb(pid)
        app.end(runs)
        clients, _, _ = group.collect(timeout_s=300)
    finally:
        group.kill()
    return {
        "idle_clients": len(clients),
        "idle_opened": opened,
        "idle_completed": sum(1 for c in clients if c["ended"] and not c["error"]),
        "idle_exact": sum(1 for c in clients if c["ended"] and c["seq_ok"] and not c["error"]),
        "idle_rss_mb": rss,
        "idle_cpu_pct": round(cpu_pct, 1),
        "idle_connect_s": round(connect_s, 1),
        "idle_resumes": sum(c["resumes"] for c in clients),
        "idle_errors": sorted({c["error"] for c in clients if c["error"]})[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--traces", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per trace")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--idle", type=int, default=10_000, help="idle clients (0: no phase 2)")
    parser.add_argument("--idle-procs", type=int, default=4)
    parser.add_argument(
        "--opening", type=int, default=1000, help="idle connects in flight per process"
    )
    parser.add_argument(
        "--hold", type=float, default=10.0, help="seconds the idle clients are held"
    )
    parser.add_argument("--only", choices=("bus", "baseline"), help="one side only (no final line)")
    args = parser.parse_args()
    if args.only:
        print(args.only, json.dumps(run(args.only, args)), flush=True)
        return

    base = run("baseline", args)
    print("baseline", json.dumps(base), flush=True)
    bus = run("bus", args)
    print("bus", json.dumps(bus), flush=True)
    final = {
        **{k: v for k, v in bus.items() if not k.endswith("errors")},
        "baseline_p50_ms": base["p50_ms"],
        "baseline_p99_ms": base["p99_ms"],
        "baseline_rss_mb": base["rss_mb"],
        "baseline_idle_rss_mb": base.get("idle_rss_mb"),
        "baseline_idle_cpu_pct": base.get("idle_cpu_pct"),
        "traces": args.traces,
        "rate_per_trace": args.rate,
        # Latency on a shared 2-core host depends on what else runs: say how busy it was.
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }
    report(final)


if __name__ == "__main__":
    main()
